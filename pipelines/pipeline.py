"""The skewless TFX pipeline, assembled from a feature spec; no ML logic lives here.

Runners (local, Kubeflow) only inject paths, the metadata connection and Beam args.
"""

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional

from tfx.components import (CsvExampleGen, Evaluator, ExampleValidator, Pusher, SchemaGen,
                            StatisticsGen, Trainer, Transform, Tuner)
from tfx.components.schema_gen.import_schema_gen.component import ImportSchemaGen
from tfx.dsl.components.common import resolver
from tfx.dsl.input_resolution.strategies.latest_blessed_model_strategy import LatestBlessedModelStrategy
from tfx.dsl.input_resolution.strategies.span_range_strategy import SpanRangeStrategy
from tfx.orchestration import pipeline as tfx_pipeline
from tfx.proto import example_gen_pb2, pusher_pb2, range_config_pb2, trainer_pb2
from tfx.types import Channel
from tfx.types.standard_artifacts import Examples, ExampleStatistics, Model, ModelBlessing, TransformCache

from components import preprocessing
from components.baseline import BaselineModelStrategy, StableModelStrategy
from components.data_gate import DataGate
from components.evaluation import eval_config
from components.feature_spec import SPAN_TOKEN, FeatureSpec, SpecError
from components.sandbox import SandboxConfig, SandboxValidator
from components.spans import LatestAnalyzerCacheStrategy, PreviousSpanStatisticsStrategy

PREPROCESSING_FN = "components.preprocessing.preprocessing_fn"
RUN_FN = "components.trainer.run_fn"
TUNER_FN = "components.tuning.tuner_fn"
# Where the Evaluator's baseline (for change thresholds) comes from:
#   excluding_candidate  the latest blessed model other than this run's candidate (BaselineModelStrategy);
#                        LocalDagRunner runs it, KubeflowV2DagRunner cannot compile a custom strategy
#   latest_blessed       TFX's LatestBlessedModelStrategy, which KubeflowV2DagRunner compiles (Vertex AI
#                        runs it; a cached rerun then compares the candidate with itself)
#   stable               the model behind the version models.config labels `stable` (what
#                        production serves; StableModelStrategy, LocalDagRunner only)
#   none                 no baseline: change thresholds are skipped, value thresholds still gate
#                        (open-source Kubeflow Pipelines implements no resolver tasks)
BASELINES = ("excluding_candidate", "latest_blessed", "stable", "none")
# The spec keys each component reads. A component's custom_config (or parameter) is part of
# its cache key (TFX 1.16 tfx/orchestration/portable/cache_utils.py get_cache_context hashes
# the node's parameters), so shipping the whole spec would make a thresholds-only edit re-run
# Transform and Trainer. The Evaluator gets its slices and thresholds through eval_config.
# name, data and schema are what parsing a spec needs; task, label and the columns shape
# the preprocessing_fn, the data gate's checks and the model's inputs.
# served: the policy and propensity columns Transform turns into training weights.
_DATA_KEYS = ("name", "data", "schema", "task", "label", "label_columns", "features", "crosses", "served")
SPEC_KEYS = {
    "data_gate": _DATA_KEYS,  # + monitoring with spans: its drift bounds gate span-to-span drift
    "Transform": _DATA_KEYS,
    "Trainer": _DATA_KEYS + ("training",),
    "Tuner": _DATA_KEYS + ("training", "tuning"),  # the Trainer gets the Tuner's choice as an artifact
}


@dataclasses.dataclass
class Environment:
    """Where a run keeps its artifacts and how it talks to metadata and Beam."""
    pipeline_root: str
    model_repository: str
    metadata_connection_config: Optional[object] = None
    beam_pipeline_args: List[str] = dataclasses.field(default_factory=list)
    enable_cache: bool = True
    # Sandbox validation thresholds (components.sandbox.SandboxConfig keys); they describe the
    # machine the model will serve on, so they belong to the environment, not the dataset.
    sandbox: Dict[str, Any] = dataclasses.field(default_factory=dict)
    baseline: str = "excluding_candidate"  # one of BASELINES
    # With spans: the data gate compares the new span with the previous one. The previous span's
    # statistics come through a custom resolver, which KubeflowV2DagRunner cannot compile.
    span_to_span_drift: bool = True


def model_push_dir(spec: FeatureSpec, env: Environment) -> str:
    """<model_repository>/<model_name>: TF Serving's layout, numeric version folders inside."""
    return os.path.join(env.model_repository, spec.name)


def data_folder(spec: FeatureSpec):
    """(folder, file pattern) CsvExampleGen reads for the spec's data.path; with spans the pattern
    keeps {SPAN} from the first path segment that holds it (ExampleGen resolves it)."""
    if spec.has_spans:
        parts = spec.data_path.rstrip("/").split("/")
        first = next(i for i, part in enumerate(parts) if SPAN_TOKEN in part)
        pattern = "/".join(parts[first:]) + ("/*.csv" if spec.data_path.endswith("/") else "")
        return "/".join(parts[:first]) or "/", pattern
    # A trailing slash marks a folder where isdir cannot look (gs://bucket/data/ on Kubeflow).
    if os.path.isdir(spec.data_path) or spec.data_path.endswith("/"):
        return spec.data_path.rstrip("/"), "*.csv"
    return os.path.dirname(spec.data_path), os.path.basename(spec.data_path)


def _example_gen(spec: FeatureSpec, data_root=None, span: Optional[int] = None) -> CsvExampleGen:
    input_base, pattern = data_folder(spec)
    if data_root is not None:  # a folder, or a RuntimeParameter a Kubeflow run fills in
        input_base = data_root
    # ExampleGen ingests the newest span (TFX 1.16 supports num_spans=1 only there), or `span` alone
    # (a static range of one span, the other form its input_processor allows); the window of spans a
    # run trains on is resolved downstream, by _training_examples.
    if span is not None:
        rolling = range_config_pb2.RangeConfig(static_range=range_config_pb2.StaticRange(
            start_span_number=span, end_span_number=span))
    else:
        rolling = (range_config_pb2.RangeConfig(rolling_range=range_config_pb2.RollingRange(num_spans=1))
                   if spec.has_spans else None)
    return CsvExampleGen(
        input_base=input_base,
        range_config=rolling,
        input_config=example_gen_pb2.Input(splits=[example_gen_pb2.Input.Split(name="single_split",
                                                                               pattern=pattern)]),
        output_config=example_gen_pb2.Output(split_config=example_gen_pb2.SplitConfig(splits=[
            example_gen_pb2.SplitConfig.Split(name=name, hash_buckets=buckets)
            for name, buckets in spec.split.items()])))


def _training_examples(spec: FeatureSpec, example_gen: CsvExampleGen):
    """(resolver or None, the Examples Transform and Trainer read): with data.rolling_spans > 1, the
    spans ExampleGen has ingested numbered newest - N + 1 to newest (TFX's SpanRangeStrategy over
    RollingRange; FeatureSpec.window_spans is the same rule on disk); else the
    newest span or the one CSV. Statistics, validation, evaluation and the sandbox read the newest
    span only: new data is checked, and the model is judged on the data it meets next."""
    if not spec.has_spans or (spec.rolling_spans or 1) == 1:
        return None, example_gen.outputs["examples"]
    window = resolver.Resolver(
        strategy_class=SpanRangeStrategy,
        config={"range_config": range_config_pb2.RangeConfig(
            rolling_range=range_config_pb2.RollingRange(num_spans=spec.rolling_spans))},
        examples=Channel(type=Examples, producer_component_id=example_gen.id)).with_id("rolling_spans")
    return window, window.outputs["examples"]


def refuse_another_input(spec: FeatureSpec, env: Environment, pipeline_name: str, data_root=None) -> None:
    """With spans: refuses a store where this pipeline's ExampleGen has ingested another input. The window
    (SpanRangeStrategy) and the previous span's statistics take every Examples of the pipeline's ExampleGen
    in the store, and a single-CSV run's carry span 0 (TFX's driver writes the span its input processor
    resolves, 0 for a pattern without {SPAN}: tfx/components/example_gen/driver.py:109-119); the window keeps
    spans >= newest - N + 1 (span_range_strategy.py:93-100), so with newest <= N - 1 a spec copied from
    taxi.yaml, still named taxi, would train on the whole CSV too, and span 1 be compared with it."""
    if not spec.has_spans or env.metadata_connection_config is None:
        return
    import re

    from pipelines import mlmd

    input_base, pattern = data_folder(spec)
    input_base = data_root if isinstance(data_root, str) else input_base
    own = re.compile(re.escape(pattern).replace(re.escape(SPAN_TOKEN), r"\d+"))
    for found in mlmd.example_gen_inputs(env.metadata_connection_config, pipeline_name):
        same_base = os.path.normpath(found["input_base"] or "") == os.path.normpath(input_base)
        if same_base and found["patterns"] and all(own.fullmatch(p) for p in found["patterns"]):
            continue
        config = env.metadata_connection_config
        store = config.sqlite.filename_uri if config.HasField("sqlite") else "the ML Metadata store"
        ingested = os.path.join(found["input_base"] or "", *found["patterns"][:1])
        raise SpecError(
            f"{store}: pipeline '{pipeline_name}' already ingested {ingested} (span {found['span']}), not this "
            f"spec's spans {os.path.join(input_base, pattern)}: its window and previous-span statistics would "
            f"take those Examples in. Give the spans spec its own name: key in {spec.source} (e.g. name: "
            f"{spec.name}_spans, which gets its own store and model folder), or remove {store} to start over")


def span_ingestion_pipeline(spec: FeatureSpec, env: Environment, span: int,
                            pipeline_name: Optional[str] = None) -> tfx_pipeline.Pipeline:
    """CsvExampleGen pinned to `span` and its StatisticsGen, under create_pipeline's pipeline name, root and
    node ids: TFX 1.16's ExampleGen ingests one span per run (tfx/components/example_gen/
    input_processor.py:40-57), so a window's older spans that arrived together are ingested by runs of
    this first. Then the window's resolver (rolling_spans) finds them among CsvExampleGen's Examples,
    and the data gate finds the previous span's statistics (previous_span_statistics)."""
    example_gen = _example_gen(spec, span=span)
    statistics_gen = StatisticsGen(examples=example_gen.outputs["examples"])
    return tfx_pipeline.Pipeline(pipeline_name=pipeline_name or spec.name, pipeline_root=env.pipeline_root,
                                 components=[example_gen, statistics_gen], enable_cache=env.enable_cache,
                                 metadata_connection_config=env.metadata_connection_config,
                                 beam_pipeline_args=env.beam_pipeline_args)


def _previous_span_statistics(spec: FeatureSpec, statistics_gen: StatisticsGen,
                              env: Environment) -> Optional[resolver.Resolver]:
    """With spans: the previous span's statistics, for the data gate's span-to-span drift check."""
    if not spec.has_spans or not env.span_to_span_drift:
        return None
    return resolver.Resolver(
        strategy_class=PreviousSpanStatisticsStrategy,
        statistics=Channel(type=ExampleStatistics, producer_component_id=statistics_gen.id),
        current=statistics_gen.outputs["statistics"]).with_id("previous_span_statistics")


def _previous_analyzer_cache(window: Optional[resolver.Resolver]) -> Optional[resolver.Resolver]:
    """With a window of spans: the latest TransformCache, so Transform re-analyzes only the spans it has
    not seen (tf.Transform keys each span's cached analyzer results by the span's data and the
    analyzer: a stale entry is a miss, never a wrong value). Without the input, Transform writes a
    cache it never reads."""
    if window is None:
        return None
    return resolver.Resolver(strategy_class=LatestAnalyzerCacheStrategy,
                             cache=Channel(type=TransformCache)).with_id("previous_analyzer_cache")


def component_config(spec: FeatureSpec, component: str) -> Dict[str, Any]:
    """spec.to_custom_config() cut down to the keys SPEC_KEYS lists for this component."""
    config = spec.to_custom_config()
    keys = SPEC_KEYS[component] + (("monitoring",) if component == "data_gate" and spec.has_spans else ())
    config["feature_spec"] = {k: v for k, v in config["feature_spec"].items() if k in keys}
    return config


def create_pipeline(spec: FeatureSpec, env: Environment, pipeline_name: Optional[str] = None, data_root=None):
    """The pipeline for `spec` in `env`. `data_root` (a folder or a RuntimeParameter) replaces the
    folder of the spec's data.path, so a runner varies the data without editing the DAG."""
    refuse_another_input(spec, env, pipeline_name or spec.name, data_root)
    example_gen = _example_gen(spec, data_root)
    window, training_examples = _training_examples(spec, example_gen)
    statistics_gen = StatisticsGen(examples=example_gen.outputs["examples"])
    if spec.schema_path:
        schema_gen = ImportSchemaGen(schema_file=spec.schema_path)
    else:
        # No fixed shapes: every column stays sparse, so an empty cell is simply absent.
        schema_gen = SchemaGen(statistics=statistics_gen.outputs["statistics"], infer_feature_shape=False)
    example_validator = ExampleValidator(statistics=statistics_gen.outputs["statistics"],
                                         schema=schema_gen.outputs["schema"])
    previous = _previous_span_statistics(spec, statistics_gen, env)
    data_gate = DataGate(anomalies=example_validator.outputs["anomalies"],
                         statistics=statistics_gen.outputs["statistics"],
                         previous_statistics=previous.outputs["statistics"] if previous else None,
                         schema=schema_gen.outputs["schema"] if previous else None,
                         feature_spec=json.dumps(component_config(spec, "data_gate"))).with_id("data_gate")
    cache = _previous_analyzer_cache(window)
    transform = Transform(examples=training_examples, schema=schema_gen.outputs["schema"],
                          analyzer_cache=cache.outputs["cache"] if cache else None,
                          preprocessing_fn=PREPROCESSING_FN,
                          custom_config=component_config(spec, "Transform"),
                          # StatisticsGen already describes the raw data; Transform's own pre-
                          # and post-transform statistics would double the Beam work.
                          disable_statistics=True,
                          # One TF1 graph instead of a tf.function traced at every step (why there).
                          force_tf_compat_v1=preprocessing.FORCE_TF_COMPAT_V1,
                          # With spans, the older spans' analyzers come from the cache (one CSV has one
                          # span). At taxi's span sizes that is slower, not faster: each span's 28 cache
                          # entries cost more Beam stages than its rows (make bench-transform-cache, 0.62x);
                          # kept on: it skips reading the older spans' rows, what bigger spans cost
                          # (not shown here: 0.99x at 20,000 rows a span).
                          disable_analyzer_cache=window is None)
    transform.add_upstream_node(data_gate)
    tuner = _tuner(spec, transform, schema_gen)
    trainer = Trainer(run_fn=RUN_FN, examples=transform.outputs["transformed_examples"],
                      transform_graph=transform.outputs["transform_graph"],
                      schema=schema_gen.outputs["schema"], custom_config=component_config(spec, "Trainer"),
                      hyperparameters=tuner.outputs["best_hyperparameters"] if tuner else None)
    trainer.add_upstream_node(data_gate)
    model_resolver = _baseline_resolver(env.baseline, trainer, env.model_repository, spec.name)
    evaluator = Evaluator(examples=example_gen.outputs["examples"], model=trainer.outputs["model"],
                          baseline_model=model_resolver.outputs["model"] if model_resolver else None,
                          eval_config=eval_config(spec))
    SandboxConfig.from_dict(env.sandbox)  # a bad key fails here, before any component runs
    sandbox = SandboxValidator(model=trainer.outputs["model"], examples=example_gen.outputs["examples"],
                               model_name=spec.name,
                               config=json.dumps(env.sandbox)).with_id("sandbox_validator")
    # Both blessings are required. The model comes from the InfraBlessing: the sandbox's
    # copy with warmup requests (TFX's InfraValidator make_warmup convention).
    pusher = Pusher(model_blessing=evaluator.outputs["blessing"], infra_blessing=sandbox.outputs["blessing"],
                    push_destination=pusher_pb2.PushDestination(
                        filesystem=pusher_pb2.PushDestination.Filesystem(
                            base_directory=model_push_dir(spec, env))))
    return tfx_pipeline.Pipeline(
        pipeline_name=pipeline_name or spec.name,
        pipeline_root=env.pipeline_root,
        components=[example_gen, *([window] if window else []), statistics_gen, schema_gen, example_validator,
                    *([previous] if previous else []), data_gate, *([cache] if cache else []), transform, *([tuner] if tuner else []), trainer, *([model_resolver] if model_resolver else []), evaluator, sandbox, pusher],
        enable_cache=env.enable_cache,
        metadata_connection_config=env.metadata_connection_config,
        beam_pipeline_args=env.beam_pipeline_args)


def _tuner(spec: FeatureSpec, transform: Transform, schema_gen) -> Optional[Tuner]:
    """With a tuning block: TFX's Tuner over the spec's search space, on the Trainer's inputs.
    Its best_hyperparameters artifact is the Trainer's `hyperparameters` input; a rerun on the same
    transformed data and search space takes it from the cache without searching again."""
    if spec.tuning is None:
        return None
    return Tuner(tuner_fn=TUNER_FN, examples=transform.outputs["transformed_examples"],
                 transform_graph=transform.outputs["transform_graph"], schema=schema_gen.outputs["schema"],
                 train_args=trainer_pb2.TrainArgs(splits=["train"]), eval_args=trainer_pb2.EvalArgs(splits=["eval"]),
                 custom_config=component_config(spec, "Tuner"))


def _baseline_resolver(baseline: str, trainer: Trainer, model_repository: str = "",
                       model_name: str = "") -> Optional[resolver.Resolver]:
    if baseline not in BASELINES:
        raise ValueError(f"baseline: '{baseline}' is not one of {', '.join(BASELINES)}")
    if baseline == "none":
        return None
    if baseline == "latest_blessed":
        return resolver.Resolver(strategy_class=LatestBlessedModelStrategy, model=Channel(type=Model),
                                 model_blessing=Channel(type=ModelBlessing)).with_id("latest_blessed_model_resolver")
    if baseline == "stable":
        return resolver.Resolver(
            strategy_class=StableModelStrategy,
            config={"model_repository": model_repository, "model_name": model_name, "label": "stable"},
            model=Channel(type=Model), model_blessing=Channel(type=ModelBlessing),
            candidate=trainer.outputs["model"]).with_id("stable_model_resolver")
    return resolver.Resolver(
        strategy_class=BaselineModelStrategy,
        model=Channel(type=Model),
        model_blessing=Channel(type=ModelBlessing),
        candidate=trainer.outputs["model"]).with_id("latest_blessed_model_resolver")
