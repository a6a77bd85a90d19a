"""Loads and checks a dataset's feature spec (configs/<dataset>.yaml).

The spec is the single description of a dataset that every other part reads:
the Transform's preprocessing_fn, the model's inputs, the serving signatures,
the Evaluator's slices and thresholds. Everything here is plain Python (no
TensorFlow) so the CLI and the tests can load a spec fast.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import math
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import yaml

from components.values import coerce

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


@dataclasses.dataclass(frozen=True)
class Threshold:
    metric: str
    lower: Optional[float] = None
    upper: Optional[float] = None
    change: Optional[float] = None  # allowed change against the baseline (negative = may drop by)


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
    # With {SPAN} in data.path: how many of the newest spans a run reads (TFX's RollingRange).
    rolling_spans: Optional[int] = None

    @property
    def columns(self) -> Dict[str, Feature]:
        """Every raw column the pipeline reads: features plus label sources."""
        return {**self.label_columns, **self.features}

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

    def csv_files(self) -> List[str]:
        """The CSVs a run reads: data.path's file or folder, or the newest rolling_spans spans' files."""
        if self.has_spans:
            spans = self.spans()[-(self.rolling_spans or 1):]
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
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def load(path: str) -> FeatureSpec:
    """Reads a spec file and checks its shape; raises SpecError naming the key at fault."""
    path = resolve_path(path)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise SpecError(f"cannot read feature spec '{path}': {e.strerror}") from e
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from e
    return parse(raw, source=path)


def parse(raw: Any, source: str = "<spec>") -> FeatureSpec:
    ctx = _Ctx(source)
    ctx.mapping(raw, "")
    ctx.known_keys(raw, "", {"name", "data", "schema", "task", "label", "label_columns",
                             "features", "slices", "thresholds", "training", "monitoring"})
    # `monitoring:` (skew/drift thresholds) is read and checked key by key by ops/monitor.py;
    # here it only has to be a mapping.
    ctx.get(raw, "monitoring", dict, default={})
    data = ctx.get(raw, "data", dict)
    ctx.known_keys(data, "data", {"path", "split", "rolling_spans"})
    rolling = ctx.get(data, "rolling_spans", int, key_prefix="data", default=None)
    if rolling is not None and (isinstance(rolling, bool) or rolling < 1):
        ctx.fail("data.rolling_spans", f"must be a whole number of spans >= 1, got {rolling!r}")
    if rolling is not None and SPAN_TOKEN not in str(data.get("path", "")):
        ctx.fail("data.rolling_spans", "needs {SPAN} in data.path (e.g. build/spans/span-{SPAN}/): "
                                       "without spans there is nothing to roll")
    split = ctx.get(data, "split", dict, key_prefix="data", default={"train": 2, "eval": 1})
    if set(split) != {"train", "eval"} or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in split.values()):
        ctx.fail("data.split", "must be {train: <int>, eval: <int>} with positive hash-bucket counts")
    task = ctx.get(raw, "task", str)
    if task not in TASKS:
        ctx.fail("task", f"'{task}' is not one of {', '.join(TASKS)}")

    features = {n: _feature(ctx, f"features.{n}", n, v)
                for n, v in ctx.get(raw, "features", dict).items()}
    if not features:
        ctx.fail("features", "declares no feature")
    label_columns = {n: _feature(ctx, f"label_columns.{n}", n, v, label_column=True)
                     for n, v in ctx.get(raw, "label_columns", dict, default={}).items()}
    for n in set(features) & set(label_columns):
        ctx.fail(f"label_columns.{n}", "is also a feature: list it under features only")
    columns = {**label_columns, **features}

    label = _label(ctx, ctx.get(raw, "label", dict), task, columns, set(label_columns))
    slices = tuple(_slice(ctx, i, s, columns) for i, s in enumerate(ctx.get(raw, "slices", list, default=[])))
    thresholds = tuple(_threshold(ctx, m, v) for m, v in ctx.get(raw, "thresholds", dict, default={}).items())
    schema = ctx.get(raw, "schema", str, default=None)
    return FeatureSpec(
        name=ctx.get(raw, "name", str),
        source=source,
        data_path=resolve_path(ctx.get(data, "path", str, key_prefix="data")),
        split=dict(split),
        schema_path=resolve_path(schema) if schema else None,
        task=task,
        label=label,
        label_columns=label_columns,
        features=features,
        slices=slices,
        thresholds=thresholds,
        training=_training(ctx, ctx.get(raw, "training", dict, default={})),
        raw=raw,
        rolling_spans=rolling,
    )


class _Ctx:
    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, message: str):
        raise SpecError(f"{self.source}: {key or '<top level>'}: {message}")

    def mapping(self, value: Any, key: str):
        if not isinstance(value, dict):
            self.fail(key, f"must be a mapping, got {type(value).__name__}")

    def known_keys(self, value: Mapping[str, Any], key: str, allowed: set):
        for k in value:
            if k not in allowed:
                self.fail(f"{key}.{k}" if key else k, f"unknown key (allowed: {', '.join(sorted(allowed))})")

    _MISSING = object()

    def get(self, obj: Mapping[str, Any], key: str, typ: type, key_prefix: str = "", default: Any = _MISSING):
        full = f"{key_prefix}.{key}" if key_prefix else key
        if key not in obj or obj[key] is None:
            if default is self._MISSING:
                self.fail(full, "is required")
            return default
        value = obj[key]
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            self.fail(full, f"must be {typ.__name__}, got {type(value).__name__} ({value!r})")
        return value


def _feature(ctx: _Ctx, key: str, name: str, raw: Any, label_column: bool = False) -> Feature:
    ctx.mapping(raw, key)
    ctx.known_keys(raw, key, {"type", "transform", "missing", "required", "top_k", "oov_buckets",
                              "buckets", "hash_buckets"})
    typ = ctx.get(raw, "type", str, key)
    if typ not in TYPES:
        ctx.fail(f"{key}.type", f"'{typ}' is not one of {', '.join(TYPES)}")
    # A label column is read, never fed to the model: it has no transform of its own.
    transforms = raw.get("transform", "passthrough" if label_column else None)
    if transforms is None:
        ctx.fail(f"{key}.transform", "is required")
    transforms = [transforms] if isinstance(transforms, str) else transforms
    if not isinstance(transforms, list) or not transforms or not all(isinstance(t, str) for t in transforms):
        ctx.fail(f"{key}.transform", f"must be a transform name or a list of them, got {raw.get('transform')!r}")
    if len(set(transforms)) != len(transforms):
        ctx.fail(f"{key}.transform", f"lists a transform twice: {transforms}")
    for transform in transforms:
        if transform not in TRANSFORMS:
            ctx.fail(f"{key}.transform", f"'{transform}' is not one of {', '.join(TRANSFORMS)}")
        if not label_column and typ == "string" and transform in ("zscore", "log", "bucketize", "passthrough"):
            ctx.fail(f"{key}.transform", f"'{transform}' needs a numeric column, '{name}' is a string")
        if typ == "float" and transform == "vocabulary":
            ctx.fail(f"{key}.transform", f"'vocabulary' needs string or int values, '{name}' is float "
                                         "(use bucketize, or hash)")
    transform = transforms[0]
    if typ == "string":
        default_fill = ""
    elif label_column or set(transforms) & {"vocabulary", "hash"}:
        default_fill = 0 if label_column else -1  # a category of its own for "missing"
    else:
        default_fill = "mean"
    missing_raw = ctx.get(raw, "missing", dict, key, default={"fill": default_fill})
    ctx.known_keys(missing_raw, f"{key}.missing", {"fill", "indicator"})
    if "fill" not in missing_raw:
        ctx.fail(f"{key}.missing.fill", "is required (a constant, or 'mean' for numeric columns)")
    fill = missing_raw["fill"]
    if fill == "mean":
        if typ == "string":
            ctx.fail(f"{key}.missing.fill", "'mean' needs a numeric column")
    elif typ == "string" and not isinstance(fill, str):
        ctx.fail(f"{key}.missing.fill", f"must be a string for a string column, got {fill!r}")
    elif typ != "string" and (not isinstance(fill, (int, float)) or isinstance(fill, bool)
                              or not math.isfinite(fill)):
        ctx.fail(f"{key}.missing.fill", f"must be a finite number or 'mean' for a {typ} column, got {fill!r}")
    elif typ == "int" and float(fill) != int(fill):
        ctx.fail(f"{key}.missing.fill", f"must be a whole number for an int column, got {fill!r}")
    if fill == "mean" and set(transforms) & {"vocabulary", "hash"}:
        ctx.fail(f"{key}.missing.fill", "'mean' makes no sense for a categorical transform: use a constant")
    indicator = ctx.get(missing_raw, "indicator", bool, f"{key}.missing", default=False)
    positive = {}
    for k, default in (("top_k", None), ("oov_buckets", 1), ("buckets", 10), ("hash_buckets", 100)):
        v = ctx.get(raw, k, int, key, default=default)
        if v is not None and v < 1:  # oov_buckets too: unseen values need an id the model can embed
            ctx.fail(f"{key}.{k}", f"must be positive, got {v}")
        positive[k] = v
    return Feature(name=name, type=typ, transform=transform, extra_transforms=tuple(transforms[1:]),
                   missing=MissingPolicy(fill, indicator),
                   required=ctx.get(raw, "required", bool, key, default=False), **positive)


def _label(ctx: _Ctx, raw: Mapping[str, Any], task: str, columns: Mapping[str, Feature], label_only) -> Label:
    ctx.known_keys(raw, "label", {"name", "column", "derive", "classes"})
    name = ctx.get(raw, "name", str, "label")
    if name in columns:
        ctx.fail("label.name", f"'{name}' clashes with a column name")
    column = ctx.get(raw, "column", str, "label", default=None)
    derive = ctx.get(raw, "derive", dict, "label", default=None)
    if bool(column) == bool(derive):
        ctx.fail("label", "give exactly one of 'column' or 'derive'")
    classes = tuple(str(c) for c in ctx.get(raw, "classes", list, "label", default=[]))
    if column:
        if column not in columns:
            ctx.fail("label.column", f"'{column}' is not declared under label_columns")
        if column not in label_only:
            ctx.fail("label.column", f"'{column}' is a feature: the model would be given its own label; "
                                     "declare it under label_columns")
        if task != "regression" and columns[column].missing.fill == "mean":
            ctx.fail(f"label_columns.{column}.missing.fill", "a class label cannot be filled with a mean")
    else:
        ctx.known_keys(derive, "label.derive", {"column", "op", "other", "scale"})
        if task != "binary":
            ctx.fail("label.derive", f"a derived label is a comparison: task must be binary, not {task}")
        for k in ("column", "other"):
            c = ctx.get(derive, k, str, "label.derive")
            if c not in columns or columns[c].type == "string":
                ctx.fail(f"label.derive.{k}", f"'{c}' must be a numeric column under label_columns or features")
        if ctx.get(derive, "op", str, "label.derive") not in LABEL_OPS:
            ctx.fail("label.derive.op", f"must be one of {' '.join(LABEL_OPS)}")
        derive = {**derive, "scale": ctx.get(derive, "scale", float, "label.derive", default=1.0)}
    if task == "binary":
        classes = classes or ("0", "1")
        if len(classes) != 2:
            ctx.fail("label.classes", f"a binary task has 2 classes, got {len(classes)}")
    elif task == "multiclass":
        if len(classes) < 3:
            ctx.fail("label.classes", "a multiclass task lists its classes (at least 3)")
        if len(set(classes)) != len(classes):
            ctx.fail("label.classes", "has duplicates")
    elif classes:
        ctx.fail("label.classes", "a regression task has no classes")
    if task == "regression" and columns[column].type == "string":
        ctx.fail("label.column", f"regression needs a numeric label column, '{column}' is a string")
    return Label(name=name, column=column, derive=derive, classes=classes)


def _slice(ctx: _Ctx, i: int, raw: Any, columns: Mapping[str, Feature]) -> Tuple[str, ...]:
    keys = [raw] if isinstance(raw, str) else raw
    if not isinstance(keys, list) or not keys:
        ctx.fail(f"slices[{i}]", "must be a feature name or a list of feature names")
    for k in keys:
        if not isinstance(k, str):
            ctx.fail(f"slices[{i}]", f"must list feature names, got {k!r}")
        if k not in columns:
            ctx.fail(f"slices[{i}]", f"'{k}' is not a declared column")
    return tuple(keys)


def _threshold(ctx: _Ctx, metric: str, raw: Any) -> Threshold:
    key = f"thresholds.{metric}"
    ctx.mapping(raw, key)
    ctx.known_keys(raw, key, {"lower", "upper", "change"})
    values = {k: ctx.get(raw, k, float, key, default=None) for k in ("lower", "upper", "change")}
    if all(v is None for v in values.values()):
        ctx.fail(key, "sets none of lower, upper, change")
    if values["lower"] is not None and values["upper"] is not None and values["lower"] > values["upper"]:
        ctx.fail(key, f"lower ({values['lower']}) is above upper ({values['upper']})")
    return Threshold(metric=metric, **values)


def _training(ctx: _Ctx, raw: Mapping[str, Any]) -> Training:
    ctx.known_keys(raw, "training", {"strategy", "deterministic", "seed", "hidden_units",
                                     "embedding_dim", "shuffle_buffer", "schedule"})
    strategy = _strategy(ctx, ctx.get(raw, "strategy", dict, "training", default={"type": "default"}))
    if strategy["type"] == "parameter_server" and raw.get("deterministic") is True:
        ctx.fail("training.deterministic", "cannot be true with training.strategy.type parameter_server: "
                                           "its workers update the variables asynchronously")
    schedule = []
    for i, s in enumerate(ctx.get(raw, "schedule", list, "training",
                                  default=[{"learning_rate": 0.001, "batch_size": 128, "epochs": 5}])):
        key = f"training.schedule[{i}]"
        ctx.mapping(s, key)
        ctx.known_keys(s, key, {"learning_rate", "batch_size", "epochs"})
        stage = Stage(ctx.get(s, "learning_rate", float, key), ctx.get(s, "batch_size", int, key),
                      ctx.get(s, "epochs", int, key))
        if not (stage.learning_rate > 0 and math.isfinite(stage.learning_rate)) or stage.batch_size < 1 or stage.epochs < 1:
            ctx.fail(key, "learning_rate, batch_size and epochs must be positive")
        schedule.append(stage)
    hidden_units = ctx.get(raw, "hidden_units", list, "training", default=[64, 32])
    if not all(isinstance(u, int) and not isinstance(u, bool) and u > 0 for u in hidden_units):
        ctx.fail("training.hidden_units", f"must be a list of positive layer widths, got {hidden_units!r}")
    if not schedule:
        ctx.fail("training.schedule", "needs at least one stage")
    for k in ("embedding_dim", "shuffle_buffer"):
        if k in raw and (not isinstance(raw[k], int) or raw[k] < 1):
            ctx.fail(f"training.{k}", f"must be a positive integer, got {raw[k]!r}")
    return Training(
        strategy=strategy,
        schedule=tuple(schedule),
        deterministic=ctx.get(raw, "deterministic", bool, "training", default=False),
        seed=ctx.get(raw, "seed", int, "training", default=42),
        hidden_units=tuple(hidden_units),
        embedding_dim=ctx.get(raw, "embedding_dim", int, "training", default=8),
        shuffle_buffer=ctx.get(raw, "shuffle_buffer", int, "training", default=10000),
    )


def _strategy(ctx: _Ctx, raw: Mapping[str, Any]) -> Dict[str, Any]:
    """The training.strategy block: a type and the options that type accepts (see STRATEGY_OPTIONS)."""
    kind = ctx.get(raw, "type", str, "training.strategy", default="default")
    if kind not in STRATEGIES:
        ctx.fail("training.strategy.type", f"'{kind}' is not one of {', '.join(STRATEGIES)}")
    options = STRATEGY_OPTIONS[kind]
    for key in raw:
        if key != "type" and key not in options:
            allowed = ", ".join(sorted(options)) or "no options"
            ctx.fail(f"training.strategy.{key}", f"unknown key for strategy '{kind}' (allowed: {allowed})")
    for key, (typ, limit) in options.items():
        value = ctx.get(raw, key, typ, "training.strategy", default=None)
        if value is None:
            continue
        if typ is int and value < limit:
            ctx.fail(f"training.strategy.{key}", f"must be at least {limit}, got {value}")
        if typ is str and limit is not None and value not in limit:
            ctx.fail(f"training.strategy.{key}", f"'{value}' is not one of {', '.join(limit)}")
    return {**raw, "type": kind}


# --- checking a spec against its data --------------------------------------------------

def check_against_data(spec: FeatureSpec, sample_rows: int = 2000) -> None:
    """Fails at once when the spec and the CSV disagree, naming the key, column and file.

    Checks every file's header and the first `sample_rows` rows' values against the
    declared types; the statistics-based data gate in the pipeline checks every row.
    """
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
                if line_no > sample_rows + 1:
                    break
                for name, feature in spec.columns.items():
                    value = row[index[name]] if index[name] < len(row) else ""
                    try:
                        coerce(value, feature.type)
                    except ValueError as e:
                        key = "label_columns" if name in spec.label_columns else "features"
                        raise SpecError(
                            f"{spec.source}: {key}.{name}.type: declared {feature.type} but column "
                            f"'{name}' holds {value!r} at {path}:{line_no} ({e})") from None
