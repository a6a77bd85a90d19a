"""Loads and checks a dataset's feature spec (configs/<dataset>.yaml).

The spec is the single description of a dataset that every other part reads:
the Transform's preprocessing_fn, the model's inputs, the serving signatures,
the Evaluator's slices and thresholds. Everything here is plain Python (no
TensorFlow) so the CLI and the tests can load a spec fast.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import glob
import math
import os
import re
from typing import Annotated, Any, ClassVar, Dict, Iterable, List, Literal, Mapping, Optional, Tuple, Union

import pydantic
import yaml

from components.values import coerce
from serving import typed_config

TYPES = ("int", "float", "string")
TRANSFORMS = ("zscore", "log", "vocabulary", "bucketize", "hash", "passthrough")
TASKS = ("binary", "multiclass", "regression")
STRATEGIES = ("default", "mirrored", "multi_worker", "parameter_server", "tpu")
# What each strategy type accepts beside `type` (components/strategy.py reads them), as
# (python type, smallest value for numbers or the allowed values for strings).
STRATEGY_OPTIONS = {
    "default": {},
    "mirrored": {"num_devices": (int, 1)},
    "multi_worker": {"communication": (str, ("auto", "ring", "nccl"))},
    "parameter_server": {"examples_per_epoch": (int, 1)},
    "tpu": {"tpu": (str, None)},
}
LABEL_OPS = (">", ">=", "<", "<=")
# Transforms whose output is an integer id fed to an embedding; the rest are floats.
CATEGORICAL_TRANSFORMS = ("vocabulary", "bucketize", "hash")
# How training uses rows of served traffic (spans written by make export-span), by their policy
# and propensity columns: weighted by 1 / propensity, or only the rows no model decided.
SERVED_USES = ("inverse_propensity", "holdback_only")
SPAN_TOKEN = "{SPAN}"  # TFX ExampleGen's span placeholder in data.path (digits on disk)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SpecError(ValueError):
    """A spec that is malformed or does not match its data; the message names the key."""


@dataclasses.dataclass(frozen=True)
class MissingPolicy:
    fill: Any  # a constant of the feature's type, or "mean"
    indicator: bool = False  # also emit <name>_missing_xf (1.0 where the value was absent)


@dataclasses.dataclass(frozen=True)
class Feature:
    name: str
    type: str
    transform: str
    missing: MissingPolicy
    required: bool = False
    top_k: Optional[int] = None
    oov_buckets: int = 1
    buckets: int = 10
    hash_buckets: int = 100
    # More views of the same column, e.g. `transform: [log, bucketize]`: a smooth input and
    # a piecewise one. Each becomes its own model input (<name>_<transform>_xf).
    extra_transforms: Tuple[str, ...] = ()

    @property
    def transforms(self) -> Tuple[str, ...]:
        return (self.transform,) + self.extra_transforms


@dataclasses.dataclass(frozen=True)
class Cross:
    """Features crossed into one categorical input: their ids joined, hashed into hash_buckets."""
    name: str
    features: Tuple[str, ...]
    hash_buckets: int


@dataclasses.dataclass(frozen=True)
class Label:
    name: str
    column: Optional[str] = None  # read directly from this column...
    derive: Optional[Mapping[str, Any]] = None  # ...or derived: {column, op, other, scale}
    classes: Tuple[str, ...] = ()

    @property
    def source_columns(self) -> Tuple[str, ...]:
        if self.column:
            return (self.column,)
        return (self.derive["column"], self.derive["other"])


@dataclasses.dataclass(frozen=True)
class Stage:
    learning_rate: float
    batch_size: int
    epochs: int


@dataclasses.dataclass(frozen=True)
class Training:
    strategy: Mapping[str, Any]
    schedule: Tuple[Stage, ...]
    deterministic: bool = False
    seed: int = 42
    hidden_units: Tuple[int, ...] = (64, 32)
    embedding_dim: int = 8
    shuffle_buffer: int = 10000
    wide: bool = False  # a linear part over the categorical inputs and crosses, added to the deep one


@dataclasses.dataclass(frozen=True)
class Tuning:
    """The Tuner's search: training keys to choose among (TUNABLE), how many trials and epochs each."""
    search_space: Mapping[str, Tuple[Any, ...]]
    trials: int = 6
    epochs: int = 2


@dataclasses.dataclass(frozen=True)
class Threshold:
    metric: str
    lower: Optional[float] = None
    upper: Optional[float] = None
    change: Optional[float] = None  # allowed change against the baseline (negative = may drop by)


@dataclasses.dataclass(frozen=True)
class Served:
    """The policy and propensity columns of served spans: read for training weights, never model inputs."""
    use: str  # one of SERVED_USES
    policy_column: str = "policy"
    propensity_column: str = "propensity"


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    name: str
    source: str  # the YAML file, for error messages
    data_path: str
    split: Mapping[str, int]
    schema_path: Optional[str]
    task: str
    label: Label
    label_columns: Mapping[str, Feature]
    features: Mapping[str, Feature]
    slices: Tuple[Tuple[str, ...], ...]
    thresholds: Tuple[Threshold, ...]
    training: Training
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)
    monitoring: Optional["MonitoringConfig"] = dataclasses.field(default=None, repr=False, compare=False)
    # With {SPAN} in data.path: the window, spans numbered newest - N + 1 to newest (TFX's RollingRange).
    rolling_spans: Optional[int] = None
    crosses: Mapping[str, Cross] = dataclasses.field(default_factory=dict)
    tuning: Optional[Tuning] = None  # None: no Tuner node, the training block is used as written
    served: Optional[Served] = None

    @property
    def columns(self) -> Dict[str, Feature]:
        """Every raw column the pipeline reads: features plus label sources."""
        return {**self.label_columns, **self.features}

    @property
    def label_by_name(self) -> bool:
        """How a label column's value becomes a class id (README "Labels and classes"): by its text's
        position in label.classes (a string column, or any multiclass label), or, for a binary task on
        a numeric column, the value is the id itself (0 = classes[0], 1 = classes[1])."""
        column = self.columns.get(self.label.column)
        return column is not None and (self.task == "multiclass" or column.type == "string")

    @property
    def num_classes(self) -> int:
        return {"binary": 2, "multiclass": len(self.label.classes), "regression": 1}[self.task]

    def to_custom_config(self) -> Dict[str, Any]:
        """JSON-friendly form handed to TFX components, so they need no access to the YAML file."""
        raw = dict(self.raw)
        # Runners may point a spec at other data or schema (dataclasses.replace): ship what is in force.
        raw["data"] = {**raw.get("data", {}), "path": self.data_path}
        raw["schema"] = self.schema_path
        return {"feature_spec": raw, "feature_spec_source": self.source}

    @classmethod
    def from_custom_config(cls, custom_config: Mapping[str, Any]) -> "FeatureSpec":
        return parse(custom_config["feature_spec"], source=custom_config["feature_spec_source"])

    @property
    def has_spans(self) -> bool:
        return SPAN_TOKEN in self.data_path

    def spans(self) -> List[int]:
        """The span numbers data.path's {SPAN} matches on disk, ascending (as ExampleGen reads digits)."""
        pattern = re.compile(re.escape(self.data_path.rstrip("/")).replace(re.escape(SPAN_TOKEN), r"(\d+)") + "$")
        found = {int(m.group(1)) for m in (pattern.match(p) for p in
                                            glob.glob(self.data_path.rstrip("/").replace(SPAN_TOKEN, "*"))) if m}
        return sorted(found)

    def window_spans(self) -> List[int]:
        """The spans a run trains on, ascending: those on disk numbered newest - rolling_spans + 1 to newest.

        TFX's rule, not "the newest N present": SpanRangeStrategy's RollingRange keeps the spans in
        [newest - num_spans + 1, newest] (tfx/dsl/input_resolution/strategies/span_range_strategy.py:79-100,
        TFX 1.16), so a gap in the numbers shortens the window (spans 1, 2, 10 with a window of 2: span 10
        only). The pipeline's window applies that strategy to what ExampleGen ingested; this is the same
        rule on the span folders, for what reads the data without TFX (fingerprint, schema tool, demo)."""
        spans = self.spans()
        if not spans:
            return []
        first = spans[-1] - (self.rolling_spans or 1) + 1
        return [span for span in spans if span >= first]

    def csv_files(self) -> List[str]:
        """The CSVs a run reads: data.path's file or folder, or the files of the window's spans (window_spans)."""
        if self.has_spans:
            spans = self.window_spans()
            files = []
            for span in spans:
                path = self.data_path.replace(SPAN_TOKEN, str(span))
                files += sorted(glob.glob(os.path.join(path, "*.csv"))) if path.endswith("/") else sorted(glob.glob(path))
            if not files:
                raise SpecError(f"{self.source}: data.path: no span matches '{self.data_path}' ({{SPAN}} is the "
                                "span number: e.g. build/spans/span-{SPAN}/)")
            return files
        if os.path.isdir(self.data_path):
            files = sorted(glob.glob(os.path.join(self.data_path, "*.csv")))
        else:
            files = [self.data_path] if os.path.exists(self.data_path) else []
        if not files:
            raise SpecError(f"{self.source}: data.path: no CSV file at '{self.data_path}'")
        return files


def resolve_path(path: str, base: str = REPO_ROOT) -> str:
    """Expands "{tfx}" to the installed tfx package and makes relative paths repo-relative."""
    if "{tfx}" in path:
        import importlib.util  # the spec loader must stay cheap: find tfx without importing it

        tfx_dir = os.path.dirname(importlib.util.find_spec("tfx").origin)
        path = path.replace("{tfx}", tfx_dir)
    path = os.path.expanduser(os.path.expandvars(path))
    if os.path.isabs(path):
        return path
    # normpath drops a trailing slash, which marks a folder (data.path: build/spans/span-{SPAN}/).
    return os.path.normpath(os.path.join(base, path)) + ("/" if path.endswith("/") else "")


def read_yaml(path: str, what: str = "feature spec", error: type = None) -> Tuple[Any, Dict[tuple, int], str]:
    """(content, line of every key, resolved path) of a config file; `error` (a SpecError) names the file."""
    error = error or SpecError
    path = resolve_path(path)
    try:
        with open(path) as f:
            raw, lines = typed_config.yaml_with_lines(f.read())
    except OSError as e:
        raise error(f"cannot read {what} '{path}': {e.strerror}") from e
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from e
    return raw, lines, path


def load(path: str) -> FeatureSpec:
    """Reads a spec file and checks its shape; raises SpecError naming the key (and its line) at fault."""
    raw, lines, path = read_yaml(path)
    return parse(raw, source=path, lines=lines)


def parse(raw: Any, source: str = "<spec>", lines: Optional[Mapping[tuple, int]] = None) -> FeatureSpec:
    """Validates a spec (SpecConfig) and builds the FeatureSpec every component reads."""
    try:
        config = SpecConfig.model_validate(raw)
    except pydantic.ValidationError as e:
        raise SpecError(typed_config.describe(e, SpecConfig, source, lines)) from None
    features = {n: _feature(n, f) for n, f in config.features.items()}
    label_columns = {n: _feature(n, f) for n, f in config.label_columns.items()}
    label = config.label
    derive = label.derive.model_dump() if label.derive else None
    classes = tuple(str(c) for c in label.classes) or (("0", "1") if config.task == "binary" else ())
    training = config.training
    return FeatureSpec(
        name=config.name,
        source=source,
        data_path=resolve_path(config.data.path),
        split=config.data.split.model_dump(),
        schema_path=resolve_path(config.schema_path) if config.schema_path else None,
        task=config.task,
        label=Label(name=label.name, column=label.column, derive=derive, classes=classes),
        label_columns=label_columns,
        features=features,
        slices=tuple(tuple(s) for s in config.slices),
        thresholds=tuple(Threshold(metric=m, **t.model_dump()) for m, t in config.thresholds.items()),
        training=Training(
            strategy=dict(training.strategy), schedule=tuple(Stage(**s.model_dump()) for s in training.schedule),
            deterministic=training.deterministic, seed=training.seed, hidden_units=tuple(training.hidden_units),
            embedding_dim=training.embedding_dim, shuffle_buffer=training.shuffle_buffer, wide=training.wide),
        raw=raw,
        monitoring=config.monitoring,
        rolling_spans=config.data.rolling_spans,
        crosses={n: Cross(n, tuple(c.features), c.hash_buckets) for n, c in config.crosses.items()},
        tuning=(Tuning({k: tuple(v) for k, v in config.tuning.search_space.items()}, config.tuning.trials,
                       config.tuning.epochs) if config.tuning else None),
        served=Served(**config.served.model_dump()) if config.served else None,
    )


def _feature(name: str, config: "FeatureConfig") -> Feature:
    return Feature(name=name, type=config.type, transform=config.transform[0],
                   extra_transforms=tuple(config.transform[1:]),
                   missing=MissingPolicy(config.missing.fill, config.missing.indicator), required=config.required,
                   top_k=config.top_k, oov_buckets=config.oov_buckets, buckets=config.buckets,
                   hash_buckets=config.hash_buckets)


# --- the spec's typed shape (pydantic): one model per block ------------------------------------
# The models check every key, type and cross-key rule; typed_config words their errors as
# '<file>: <key.path>: <why> (<file>:<line>)'. `make schema-json` writes their JSON Schema.

PositiveInt = Annotated[int, pydantic.Field(gt=0)]
PositiveFloat = Annotated[float, pydantic.Field(gt=0, allow_inf_nan=False)]


_Block = typed_config.StrictConfig


# YAML may give one transform as a bare name; the validator below turns it into a list.
_ONE_OR_MANY_TRANSFORMS = pydantic.WithJsonSchema({
    "description": "a transform name or a list of them (more views of the same column)",
    "anyOf": [{"enum": list(TRANSFORMS)}, {"type": "array", "items": {"enum": list(TRANSFORMS)}, "minItems": 1}]})


class SplitConfig(_Block):
    train: PositiveInt = 2
    eval: PositiveInt = 1


class DataConfig(_Block):
    path: str
    split: SplitConfig = SplitConfig()
    rolling_spans: Optional[PositiveInt] = pydantic.Field(
        default=None, description="with {SPAN} in path: a run trains on spans numbered newest - N + 1 to newest")

    @pydantic.model_validator(mode="after")
    def _spans(self):
        if self.rolling_spans is not None and SPAN_TOKEN not in self.path:
            raise typed_config.at("rolling_spans", "needs {SPAN} in data.path (e.g. build/spans/span-{SPAN}/): "
                                                   "without spans there is nothing to roll")
        return self


class MissingConfig(_Block):
    fill: Any = pydantic.Field(description="a constant of the column's type, or 'mean' for numeric columns")
    indicator: bool = False


class FeatureConfig(_Block):
    type: Literal[TYPES]
    transform: Annotated[List[Literal[TRANSFORMS]], _ONE_OR_MANY_TRANSFORMS]
    missing: Optional[MissingConfig] = None
    required: bool = False
    top_k: Optional[PositiveInt] = None
    oov_buckets: PositiveInt = 1  # unseen values need an id the model can embed
    buckets: PositiveInt = 10
    hash_buckets: PositiveInt = 100

    _label_column: ClassVar[bool] = False

    @pydantic.field_validator("transform", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            raise typed_config.at("", f"must be a transform name or a list of them, got {value!r}")
        for transform in value:
            if transform not in TRANSFORMS:  # here, not by the Literal, to name the key and not its [index]
                raise typed_config.at("", f"'{transform}' is not one of {', '.join(TRANSFORMS)}")
        return value

    @pydantic.model_validator(mode="after")
    def _transforms_fit_the_type(self) -> "FeatureConfig":
        transforms, typ = self.transform, self.type
        if not transforms:
            raise typed_config.at("transform", "must be a transform name or a list of them, got []")
        if len(set(transforms)) != len(transforms):
            raise typed_config.at("transform", f"lists a transform twice: {transforms}")
        for transform in transforms:
            if not self._label_column and typ == "string" and transform in ("zscore", "log", "bucketize",
                                                                             "passthrough"):
                raise typed_config.at("transform", f"'{transform}' needs a numeric column, this column is a string")
            if typ == "float" and transform == "vocabulary":
                raise typed_config.at("transform", "'vocabulary' needs string or int values, this column is float "
                                                   "(use bucketize, or hash)")
        if self.missing is None:
            self.missing = MissingConfig(fill=self._default_fill())
        self._check_fill(self.missing.fill)
        return self

    def _default_fill(self) -> Any:
        if self.type == "string":
            return ""
        if self._label_column or set(self.transform) & {"vocabulary", "hash"}:
            return 0 if self._label_column else -1  # a category of its own for "missing"
        return "mean"

    def _check_fill(self, fill: Any) -> None:
        key, typ = "missing.fill", self.type
        if fill == "mean":
            if typ == "string":
                raise typed_config.at(key, "'mean' needs a numeric column")
            if set(self.transform) & {"vocabulary", "hash"}:
                raise typed_config.at(key, "'mean' makes no sense for a categorical transform: use a constant")
        elif typ == "string" and not isinstance(fill, str):
            raise typed_config.at(key, f"must be a string for a string column, got {fill!r}")
        elif typ != "string" and (not isinstance(fill, (int, float)) or isinstance(fill, bool)
                                  or not math.isfinite(fill)):
            raise typed_config.at(key, f"must be a finite number or 'mean' for a {typ} column, got {fill!r}")
        elif typ == "int" and float(fill) != int(fill):
            raise typed_config.at(key, f"must be a whole number for an int column, got {fill!r}")


class LabelColumnConfig(FeatureConfig):
    """A column read only for the label: never fed to the model, so it has no transform of its own."""
    transform: Annotated[List[Literal[TRANSFORMS]], _ONE_OR_MANY_TRANSFORMS] = ["passthrough"]

    _label_column: ClassVar[bool] = True


class DeriveConfig(_Block):
    column: str
    op: Literal[LABEL_OPS]
    other: str
    scale: float = 1.0


class LabelConfig(_Block):
    name: str
    column: Optional[str] = None  # read directly from this column...
    derive: Optional[DeriveConfig] = None  # ...or derived: {column, op, other, scale}
    classes: List[Union[str, int]] = []

    @pydantic.model_validator(mode="after")
    def _one_source(self) -> "LabelConfig":
        if bool(self.column) == bool(self.derive):
            raise typed_config.at("", "give exactly one of 'column' or 'derive'")
        return self


class ThresholdConfig(_Block):
    lower: Optional[float] = None
    upper: Optional[float] = None
    change: Optional[float] = None  # allowed change against the baseline (negative = may drop by)

    @pydantic.model_validator(mode="after")
    def _some_bound(self) -> "ThresholdConfig":
        if self.lower is None and self.upper is None and self.change is None:
            raise typed_config.at("", "sets none of lower, upper, change")
        if self.lower is not None and self.upper is not None and self.lower > self.upper:
            raise typed_config.at("", f"lower ({self.lower}) is above upper ({self.upper})")
        return self


class StageConfig(_Block):
    learning_rate: PositiveFloat
    batch_size: PositiveInt
    epochs: PositiveInt


class TrainingConfig(_Block):
    strategy: Dict[str, Any] = pydantic.Field(
        default={"type": "default"}, description="type: " + " | ".join(STRATEGIES) + "; its options: "
        + "; ".join(f"{k}: {', '.join(v) or 'none'}" for k, v in STRATEGY_OPTIONS.items()))
    deterministic: bool = False
    seed: int = 42
    hidden_units: List[PositiveInt] = [64, 32]
    embedding_dim: PositiveInt = 8
    shuffle_buffer: PositiveInt = 10000
    wide: bool = pydantic.Field(False, description="add a linear (wide) part over the categorical inputs and "
                                                   "crosses to the deep one (wide-and-deep)")
    schedule: List[StageConfig] = pydantic.Field(
        default=[StageConfig(learning_rate=0.001, batch_size=128, epochs=5)], min_length=1)

    @pydantic.model_validator(mode="after")
    def _strategy_options(self) -> "TrainingConfig":
        """training.strategy: a type and the options that type accepts (see STRATEGY_OPTIONS)."""
        kind = self.strategy.get("type", "default")
        if kind not in STRATEGIES:
            raise typed_config.at("strategy.type", f"'{kind}' is not one of {', '.join(STRATEGIES)}")
        options = STRATEGY_OPTIONS[kind]
        for key, value in self.strategy.items():
            if key == "type":
                continue
            if key not in options:
                allowed = ", ".join(sorted(options)) or "no options"
                raise typed_config.at(f"strategy.{key}", f"unknown key for strategy '{kind}' (allowed: {allowed})")
            typ, limit = options[key]
            if not isinstance(value, typ) or isinstance(value, bool):
                raise typed_config.at(f"strategy.{key}", f"must be {typ.__name__}, got {value!r}")
            if typ is int and value < limit:
                raise typed_config.at(f"strategy.{key}", f"must be at least {limit}, got {value}")
            if typ is str and limit is not None and value not in limit:
                raise typed_config.at(f"strategy.{key}", f"'{value}' is not one of {', '.join(limit)}")
        if kind == "parameter_server" and self.deterministic:
            raise typed_config.at("deterministic", "cannot be true with training.strategy.type parameter_server: "
                                                   "its workers update the variables asynchronously")
        self.strategy = {**self.strategy, "type": kind}
        return self


class CrossConfig(_Block):
    """A feature cross: the features' ids (each one's first categorical transform) hashed together."""
    features: List[str] = pydantic.Field(min_length=2, description="two or more feature names to cross")
    hash_buckets: PositiveInt = 1000


# The training keys a Tuner may choose (tuning.search_space), with a check of one candidate value:
# (what it must be, test). learning_rate is the first schedule stage's; later stages keep theirs.
TUNABLE = {
    "learning_rate": ("a positive number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                      and math.isfinite(v) and v > 0),
    "embedding_dim": ("a positive whole number", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0),
    "hidden_units": ("a list of positive whole numbers", lambda v: isinstance(v, list) and bool(v) and all(
        isinstance(u, int) and not isinstance(u, bool) and u > 0 for u in v)),
    "wide": ("true or false", lambda v: isinstance(v, bool)),
}


class TuningConfig(_Block):
    """Opt-in: the pipeline runs TFX's Tuner (KerasTuner random search) before the Trainer."""
    search_space: Dict[str, List[Any]] = pydantic.Field(
        min_length=1, description="training key -> the values to try; keys: " + ", ".join(TUNABLE))
    trials: PositiveInt = 6
    epochs: PositiveInt = pydantic.Field(2, description="epochs per trial, at the first stage's batch size")

    @pydantic.model_validator(mode="after")
    def _known_values(self) -> "TuningConfig":
        for key, values in self.search_space.items():
            if key not in TUNABLE:
                raise typed_config.at(f"search_space.{key}", f"cannot be tuned (tunable: {', '.join(TUNABLE)})")
            if not values:
                raise typed_config.at(f"search_space.{key}", "lists no value to try: give one or more")
            what, ok = TUNABLE[key]
            bad = next((v for v in values if not ok(v)), None)
            if bad is not None or (None in values):
                raise typed_config.at(f"search_space.{key}", f"each value must be {what}, got {bad!r}")
        return self


Distance = Annotated[float, pydantic.Field(gt=0, le=1, allow_inf_nan=False,
                                           description="a TFDV distance; 1 is the largest TFDV reports")]


class ComparatorThresholds(_Block):
    infinity_norm: Optional[Distance] = None
    jensen_shannon_divergence: Optional[Distance] = None


class SpanDriftConfig(ComparatorThresholds):
    """The data gate's bounds between a span and the previous one (components/spans.py span_drift)."""
    min_values: Optional[PositiveInt] = pydantic.Field(None, description=(
        "a feature with fewer values in either span is not judged (TFDV's distances over few values are noise)"))
    ignore: List[str] = pydantic.Field(default=[], description=(
        "columns never judged between spans, e.g. the time the spans are cut by: consecutive spans never "
        "share its values"))
    features: Dict[str, ComparatorThresholds] = pydantic.Field(default={}, description=(
        "column -> its own bounds, e.g. an int that names categories: StatisticsGen describes it as a number"))


class FeatureMonitoring(_Block):
    skew: Optional[ComparatorThresholds] = None
    drift: Optional[ComparatorThresholds] = None


class MonitoringConfig(_Block):
    """Skew/drift thresholds of served traffic (ops/monitor.py; a key left out keeps the monitor's default),
    and span_drift, the data gate's bounds between spans (none: spans are not compared)."""
    window_hours: Optional[PositiveFloat] = None
    min_values: Optional[PositiveInt] = None
    skew: Optional[ComparatorThresholds] = None
    drift: Optional[ComparatorThresholds] = None
    features: Dict[str, FeatureMonitoring] = {}
    span_drift: Optional[SpanDriftConfig] = None


def unmonitorable_feature(monitoring: MonitoringConfig, features: Iterable[str]) -> Optional[str]:
    """The first name under monitoring.features that is not a feature, or None."""
    return next((n for n in monitoring.features if n not in features), None)


def parse_monitoring(block: Any, source: str, spec: FeatureSpec, prefix: tuple = ()) -> MonitoringConfig:
    """A monitoring block given apart from the spec (ops/monitor.py's --thresholds), checked like the spec's."""
    try:
        config = MonitoringConfig.model_validate(block)
    except pydantic.ValidationError as e:
        raise SpecError(typed_config.describe(e, MonitoringConfig, source, prefix=prefix)) from None
    stranger = unmonitorable_feature(config, spec.features)
    if stranger:
        key = typed_config.key_path(tuple(prefix) + ("features", stranger))
        raise SpecError(f"{source}: {key}: not a feature of {spec.source} (features: {', '.join(spec.features)})")
    return config


class ServedConfig(_Block):
    """Rows of served traffic (make export-span adds these two columns to a span's data.csv; a span
    that was never served lacks them or leaves them empty: weight 1, policy none)."""
    use: Literal[SERVED_USES] = pydantic.Field(description=(
        "holdback_only: train on held-back rows and rows never served, drop the rows a model decided: the "
        "unbiased estimate of outcomes without the model (ops/feedback_loop.py: bias +0.009 on the users the "
        "model targets, naive +0.224); inverse_propensity: each row weighted by 1 / its propensity, which the "
        "proxy logs per policy (1 - share for the model, share for a held-back row), not per answer, so the "
        "weighted rows count each policy's population once and the model learns the mean of the outcomes with "
        "and without the model's answers: a trade of bias for variance between naive retraining and "
        "holdback_only (bias +0.127), from every row"))
    policy_column: str = "policy"
    propensity_column: str = "propensity"

    @pydantic.model_validator(mode="after")
    def _two_columns(self) -> "ServedConfig":
        if self.policy_column == self.propensity_column:
            raise typed_config.at("propensity_column", f"'{self.propensity_column}' is also the policy_column: "
                                                       "they are two columns")
        return self


class SpecConfig(_Block):
    """A dataset's feature spec (configs/<dataset>.yaml)."""
    name: str
    data: DataConfig
    schema_path: Optional[str] = pydantic.Field(None, alias="schema")
    task: Literal[TASKS]
    label: LabelConfig
    label_columns: Dict[str, LabelColumnConfig] = {}
    features: Dict[str, FeatureConfig]
    slices: Annotated[List[List[str]], pydantic.WithJsonSchema({
        "type": "array", "description": "TFMA slices: each a column name or a list of them",
        "items": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]}})] = []
    thresholds: Dict[str, ThresholdConfig] = {}
    training: TrainingConfig = TrainingConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    crosses: Dict[str, CrossConfig] = pydantic.Field(
        default={}, description="name -> features crossed into one hashed categorical input (<name>_xf)")
    tuning: Optional[TuningConfig] = None
    served: Optional[ServedConfig] = None

    @pydantic.field_validator("slices", mode="before")
    @classmethod
    def _bare_names(cls, value: Any) -> Any:
        return [[s] if isinstance(s, str) else s for s in value] if isinstance(value, list) else value

    @pydantic.model_validator(mode="after")
    def _columns_agree(self) -> "SpecConfig":
        if not self.features:
            raise typed_config.at("features", "declares no feature")
        for n in self.label_columns:
            if n in self.features:
                raise typed_config.at(f"label_columns.{n}", "is also a feature: list it under features only")
        columns = {**self.label_columns, **self.features}
        self._check_label(columns)
        for i, keys in enumerate(self.slices):
            if not keys:
                raise typed_config.at(f"slices.{i}", "must be a feature name or a list of feature names")
            for k in keys:
                if k not in columns:
                    raise typed_config.at(f"slices.{i}", f"'{k}' is not a declared column")
        stranger = unmonitorable_feature(self.monitoring, self.features)
        if stranger:
            raise typed_config.at(f"monitoring.features.{stranger}",
                                  f"not a feature of this spec (features: {', '.join(self.features)})")
        span_drift = self.monitoring.span_drift
        for key, names in (("ignore", span_drift.ignore), ("features", span_drift.features)) if span_drift else ():
            stranger = next((n for n in names if n not in columns), None)
            if stranger:
                raise typed_config.at(f"monitoring.span_drift.{key}", f"'{stranger}' is not a declared column "
                                                                      f"(columns: {', '.join(columns)})")
        if self.served:
            for key in ("policy_column", "propensity_column"):
                column = getattr(self.served, key)
                if column in columns or column == self.label.name:
                    raise typed_config.at(f"served.{key}", f"'{column}' is a declared column or the label: the "
                                                           "served columns must never become model inputs; name "
                                                           "another column")
        return self

    @pydantic.model_validator(mode="after")
    def _crosses_of_categorical_features(self) -> "SpecConfig":
        outputs = {f"{n}_{t}" for n, f in self.features.items() for t in f.transform[1:]} | set(self.features)
        for name, cross in self.crosses.items():
            if name in outputs or name == self.label.name:
                raise typed_config.at(f"crosses.{name}", f"'{name}' is already a model input's name: "
                                                         "give the cross another name")
            for i, feature in enumerate(cross.features):
                if feature not in self.features:
                    raise typed_config.at(f"crosses.{name}.features", f"'{feature}' is not a feature "
                                                                      f"(features: {', '.join(self.features)})")
                if not set(self.features[feature].transform) & set(CATEGORICAL_TRANSFORMS):
                    raise typed_config.at(
                        f"crosses.{name}.features", f"'{feature}' has no categorical transform to cross: add one "
                        f"of {', '.join(CATEGORICAL_TRANSFORMS)} to features.{feature}.transform")
            if len(set(cross.features)) != len(cross.features):
                raise typed_config.at(f"crosses.{name}.features", f"names a feature twice: {cross.features}")
        return self

    def _check_label(self, columns: Mapping[str, FeatureConfig]) -> None:
        label, task = self.label, self.task
        if label.name in columns:
            raise typed_config.at("label.name", f"'{label.name}' clashes with a column name")
        if label.column:
            if label.column not in columns:
                raise typed_config.at("label.column", f"'{label.column}' is not declared under label_columns")
            if label.column not in self.label_columns:
                raise typed_config.at("label.column", f"'{label.column}' is a feature: the model would be given "
                                                      "its own label; declare it under label_columns")
            if task != "regression" and columns[label.column].missing.fill == "mean":
                raise typed_config.at(f"label_columns.{label.column}.missing.fill",
                                      "a class label cannot be filled with a mean")
        else:
            if task != "binary":
                raise typed_config.at("label.derive", f"a derived label is a comparison: task must be binary, "
                                                      f"not {task}")
            for k in ("column", "other"):
                c = getattr(label.derive, k)
                if c not in columns or columns[c].type == "string":
                    raise typed_config.at(f"label.derive.{k}",
                                          f"'{c}' must be a numeric column under label_columns or features")
        classes = [str(c) for c in label.classes]
        if task == "binary" and classes and len(classes) != 2:
            raise typed_config.at("label.classes", f"a binary task has 2 classes, got {len(classes)}")
        if task == "multiclass":
            if len(classes) < 3:
                raise typed_config.at("label.classes", "a multiclass task lists its classes (at least 3)")
            if len(set(classes)) != len(classes):
                raise typed_config.at("label.classes", "has duplicates")
        if task == "regression" and classes:
            raise typed_config.at("label.classes", "a regression task has no classes")
        if task == "multiclass" and label.column and columns[label.column].type == "float":
            raise typed_config.at(f"label_columns.{label.column}.type",
                                  "a multiclass label is matched to label.classes by its text, and a float's "
                                  "text ('1.000000') matches no class: declare the column int or string")
        if task == "regression" and columns[label.column].type == "string":
            raise typed_config.at("label.column", f"regression needs a numeric label column, "
                                                  f"'{label.column}' is a string")


SCHEMA_JSON = os.path.join(REPO_ROOT, "configs", "spec.schema.json")


def json_schema() -> Dict[str, Any]:
    """The JSON Schema of a spec file, from SpecConfig: editors validate configs/*.yaml with it."""
    schema = SpecConfig.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "skewless dataset feature spec (configs/<dataset>.yaml)"
    return schema


def write_json_schema(path: str = SCHEMA_JSON) -> str:
    """Writes json_schema() as stable, sorted JSON (`make schema-json`); returns the path."""
    import json

    with open(path, "w") as f:
        f.write(json.dumps(json_schema(), indent=2, sort_keys=True) + "\n")
    return path


# --- checking a spec against its data --------------------------------------------------

def check_against_data(spec: FeatureSpec, sample_rows: int = 2000) -> None:
    """Fails at once when the spec and the CSV disagree, naming the key, column and file.

    Checks every file's header and the first `sample_rows` rows' values against the
    declared types, and the label's values against label.classes; the statistics-based
    data gate in the pipeline checks every row.
    """
    bad = next(bad_values(spec, sample_rows), None)
    if bad is not None:
        raise SpecError(bad.message(spec))
    _check_label_values(spec, sample_rows)


@dataclasses.dataclass(frozen=True)
class BadValue:
    """A CSV cell that does not read as its column's declared type."""
    column: str
    value: str
    path: str
    line: int
    reason: str

    def message(self, spec: FeatureSpec, source: bool = True) -> str:
        """'<spec file>: <key>: why, at <file>:<line>' (without the spec file when `source` is false)."""
        feature = spec.columns[self.column]
        key = "label_columns" if self.column in spec.label_columns else "features"
        return (f"{spec.source + ': ' if source else ''}{key}.{self.column}.type: declared {feature.type} but column "
                f"'{self.column}' holds {self.value!r} at {self.path}:{self.line} ({self.reason})")


def _rows(spec: FeatureSpec, sample_rows: Optional[int]) -> Iterable[Tuple[str, int, Dict[str, str]]]:
    """(file, line, {column: cell}) of the spec's columns, the first `sample_rows` rows of each file
    (all with None); a file that lacks a declared column raises SpecError."""
    for path in spec.csv_files():
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None) or []
            missing = [n for n in spec.columns if n not in header]
            if missing:
                key = "label_columns" if missing[0] in spec.label_columns else "features"
                raise SpecError(
                    f"{spec.source}: {key}.{missing[0]}: column '{missing[0]}' is not in {path} "
                    f"(its columns: {', '.join(header)})")
            index = {n: header.index(n) for n in spec.columns}
            for line_no, row in enumerate(reader, start=2):
                if sample_rows is not None and line_no > sample_rows + 1:
                    break
                yield path, line_no, {n: row[i] if i < len(row) else "" for n, i in index.items()}


def bad_values(spec: FeatureSpec, sample_rows: Optional[int] = None,
               columns: Optional[Iterable[str]] = None) -> Iterable[BadValue]:
    """Every cell of `columns` (default: all the spec's) that its declared type refuses, in file order;
    `sample_rows` limits each file to its first rows (the up-front check), None reads them all (the
    data gate, locating a value its statistics saw)."""
    wanted = {n: spec.columns[n] for n in (columns if columns is not None else spec.columns)}
    for path, line_no, cells in _rows(spec, sample_rows):
        for name, feature in wanted.items():
            try:
                coerce(cells[name], feature.type)
            except ValueError as e:
                yield BadValue(name, cells[name], path, line_no, str(e))


def _label_text(spec: FeatureSpec, cell: str) -> str:
    """The text a label cell is matched to label.classes by (its fill when empty), as preprocessing does."""
    column = spec.columns[spec.label.column]
    value = coerce(cell, column.type)
    if value is None:
        return str(column.missing.fill)
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _check_label_values(spec: FeatureSpec, sample_rows: int) -> None:
    """The label column's values in the sample map to label.classes (see FeatureSpec.label_by_name)."""
    if spec.task == "regression" or not spec.label.column:
        return
    name, classes = spec.label.column, list(spec.label.classes)
    first: Dict[str, Tuple[str, int]] = {}
    for path, line_no, cells in _rows(spec, sample_rows):
        first.setdefault(_label_text(spec, cells[name]), (path, line_no))
    seen = ", ".join(sorted(first)[:20]) + (" ..." if len(first) > 20 else "")
    where = f"label.classes: [{', '.join(classes)}]; the values of column '{name}' in the first {sample_rows} rows: {seen}"
    if not spec.label_by_name:
        strangers = sorted(t for t in first if float(t) not in (0.0, 1.0))
        if not strangers:
            return
        codes = sorted(first, key=float)
        path, line_no = first[strangers[0]]
        fix = (f"declare label_columns.{name}.type: string and list its codes in class order, e.g. "
               f"classes: [{', '.join(codes)}]" if len(codes) == 2 else f"recode column '{name}' to 0/1")
        raise SpecError(
            f"{spec.source}: label.classes: column '{name}' holds {strangers[0]} at {path}:{line_no}, but a binary "
            f"task reads a numeric label as the class id itself (0 = '{classes[0]}', 1 = '{classes[1]}'), so only "
            f"0 and 1 may appear: {fix} ({where})")
    strangers = sorted((t for t in first if t not in classes), key=lambda t: first[t][1])
    if not strangers:
        return
    text = strangers[0]
    path, line_no = first[text]
    unused = [c for c in classes if c not in first]
    near = difflib.get_close_matches(text, unused or classes, n=1)
    if near:
        fix = f"did you mean '{text}' for '{near[0]}'?"
    elif text == str(spec.columns[name].missing.fill):
        fix = (f"an empty cell takes label_columns.{name}.missing.fill ({text!r}), which is not a class: drop "
               "rows without a label or fill them with a class")
    else:
        fix = "add it to label.classes (class ids follow the list's order) or drop those rows"
    raise SpecError(f"{spec.source}: label.classes: column '{name}' holds '{text}' at {path}:{line_no}, which is "
                    f"not a class: {fix} ({where})")


if __name__ == "__main__":  # make schema-json
    import sys

    print(write_json_schema(*sys.argv[1:2]))
