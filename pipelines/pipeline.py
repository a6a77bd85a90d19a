"""The skewless TFX pipeline, assembled from a feature spec; no ML logic lives here.

Runners (local, Kubeflow) only inject paths, the metadata connection and Beam args.
"""

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional

from tfx.components import (CsvExampleGen, Evaluator, ExampleValidator, Pusher, SchemaGen,
                            StatisticsGen, Trainer, Transform)
from tfx.components.schema_gen.import_schema_gen.component import ImportSchemaGen
from tfx.dsl.components.common import resolver
from tfx.dsl.input_resolution.strategies.latest_blessed_model_strategy import LatestBlessedModelStrategy
from tfx.orchestration import pipeline as tfx_pipeline
from tfx.proto import example_gen_pb2, pusher_pb2
from tfx.types import Channel
from tfx.types.standard_artifacts import Model, ModelBlessing

from components.baseline import BaselineModelStrategy
from components.data_gate import DataGate
from components.evaluation import eval_config
from components.feature_spec import FeatureSpec
from components.sandbox import SandboxConfig, SandboxValidator

PREPROCESSING_FN = "components.preprocessing.preprocessing_fn"
RUN_FN = "components.trainer.run_fn"
# Where the Evaluator's baseline (for change thresholds) comes from:
#   excluding_candidate  the latest blessed model other than this run's candidate (BaselineModelStrategy);
#                        LocalDagRunner runs it, KubeflowV2DagRunner cannot compile a custom strategy
#   latest_blessed       TFX's LatestBlessedModelStrategy, which KubeflowV2DagRunner compiles (Vertex AI
#                        runs it; a cached rerun then compares the candidate with itself)
#   none                 no baseline: change thresholds are skipped, value thresholds still gate
#                        (open-source Kubeflow Pipelines implements no resolver tasks)
BASELINES = ("excluding_candidate", "latest_blessed", "none")
# The spec keys each component reads. A component's custom_config (or parameter) is part of
# its cache key (TFX 1.16 tfx/orchestration/portable/cache_utils.py get_cache_context hashes
# the node's parameters), so shipping the whole spec would make a thresholds-only edit re-run
# Transform and Trainer. The Evaluator gets its slices and thresholds through eval_config.
# name, data and schema are what parsing a spec needs; task, label and the columns shape
# the preprocessing_fn, the data gate's checks and the model's inputs.
_DATA_KEYS = ("name", "data", "schema", "task", "label", "label_columns", "features")
SPEC_KEYS = {
    "data_gate": _DATA_KEYS,
    "Transform": _DATA_KEYS,
    "Trainer": _DATA_KEYS + ("training",),
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


def model_push_dir(spec: FeatureSpec, env: Environment) -> str:
    """<model_repository>/<model_name>: TF Serving's layout, numeric version folders inside."""
    return os.path.join(env.model_repository, spec.name)


def _example_gen(spec: FeatureSpec) -> CsvExampleGen:
    # A trailing slash marks a folder where isdir cannot look (gs://bucket/data/ on Kubeflow).
    if os.path.isdir(spec.data_path) or spec.data_path.endswith("/"):
        input_base, pattern = spec.data_path.rstrip("/"), "*.csv"
    else:
        input_base, pattern = os.path.dirname(spec.data_path), os.path.basename(spec.data_path)
    return CsvExampleGen(
        input_base=input_base,
        input_config=example_gen_pb2.Input(splits=[example_gen_pb2.Input.Split(name="single_split",
                                                                               pattern=pattern)]),
        output_config=example_gen_pb2.Output(split_config=example_gen_pb2.SplitConfig(splits=[
            example_gen_pb2.SplitConfig.Split(name=name, hash_buckets=buckets)
            for name, buckets in spec.split.items()])))


def component_config(spec: FeatureSpec, component: str) -> Dict[str, Any]:
    """spec.to_custom_config() cut down to the keys SPEC_KEYS lists for this component."""
    config = spec.to_custom_config()
    config["feature_spec"] = {k: v for k, v in config["feature_spec"].items() if k in SPEC_KEYS[component]}
    return config


def create_pipeline(spec: FeatureSpec, env: Environment, pipeline_name: Optional[str] = None):
    example_gen = _example_gen(spec)
    statistics_gen = StatisticsGen(examples=example_gen.outputs["examples"])
    if spec.schema_path:
        schema_gen = ImportSchemaGen(schema_file=spec.schema_path)
    else:
        # No fixed shapes: every column stays sparse, so an empty cell is simply absent.
        schema_gen = SchemaGen(statistics=statistics_gen.outputs["statistics"], infer_feature_shape=False)
    example_validator = ExampleValidator(statistics=statistics_gen.outputs["statistics"],
                                         schema=schema_gen.outputs["schema"])
    data_gate = DataGate(anomalies=example_validator.outputs["anomalies"],
                         statistics=statistics_gen.outputs["statistics"],
                         feature_spec=json.dumps(component_config(spec, "data_gate"))).with_id("data_gate")
    transform = Transform(examples=example_gen.outputs["examples"], schema=schema_gen.outputs["schema"],
                          preprocessing_fn=PREPROCESSING_FN,
                          custom_config=component_config(spec, "Transform"),
                          # StatisticsGen already describes the raw data; Transform's own pre-
                          # and post-transform statistics would double the Beam work.
                          disable_statistics=True,
                          # The analyzer cache pays off for incremental spans; one CSV has one span.
                          disable_analyzer_cache=True)
    transform.add_upstream_node(data_gate)
    trainer = Trainer(run_fn=RUN_FN, examples=transform.outputs["transformed_examples"],
                      transform_graph=transform.outputs["transform_graph"],
                      schema=schema_gen.outputs["schema"], custom_config=component_config(spec, "Trainer"))
    trainer.add_upstream_node(data_gate)
    model_resolver = _baseline_resolver(env.baseline, trainer)
    evaluator = Evaluator(examples=example_gen.outputs["examples"], model=trainer.outputs["model"],
                          baseline_model=model_resolver.outputs["model"] if model_resolver else None,
                          eval_config=eval_config(spec))
    SandboxConfig.from_dict(env.sandbox)  # a bad key fails here, before any component runs
    sandbox = SandboxValidator(model=trainer.outputs["model"], examples=example_gen.outputs["examples"],
                               model_blessing=evaluator.outputs["blessing"], model_name=spec.name,
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
        components=[example_gen, statistics_gen, schema_gen, example_validator, data_gate, transform,
                    trainer, *([model_resolver] if model_resolver else []), evaluator, sandbox, pusher],
        enable_cache=env.enable_cache,
        metadata_connection_config=env.metadata_connection_config,
        beam_pipeline_args=env.beam_pipeline_args)


def _baseline_resolver(baseline: str, trainer: Trainer) -> Optional[resolver.Resolver]:
    if baseline not in BASELINES:
        raise ValueError(f"baseline: '{baseline}' is not one of {', '.join(BASELINES)}")
    if baseline == "none":
        return None
    if baseline == "latest_blessed":
        return resolver.Resolver(strategy_class=LatestBlessedModelStrategy, model=Channel(type=Model),
                                 model_blessing=Channel(type=ModelBlessing)).with_id("latest_blessed_model_resolver")
    return resolver.Resolver(
        strategy_class=BaselineModelStrategy,
        model=Channel(type=Model),
        model_blessing=Channel(type=ModelBlessing),
        candidate=trainer.outputs["model"]).with_id("latest_blessed_model_resolver")
