"""Runs one TFX component in a Kubeflow Pipelines 2 pod: TFX's v2 entrypoint, input types repaired.

The compiled pipeline (pipelines/kubeflow_runner.py) starts every component as

    python -m pipelines.kubeflow_entrypoint --executor_class_path ... \\
        --json_serialized_invocation_args '{{$}}' --json_serialized_inputs_spec_args '{...}' <beam args>

which are the arguments of TFX's own entrypoint
(tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor). That entrypoint was written
for Vertex AI Pipelines, which hands each input artifact over with the TFX type the compiled spec
declares (`title: tfx.Examples` and its properties). TFX finds the artifact's Python class from
that title; when the input arrives with a `system.*` title or with no schema, the lookup fails
before the executor starts (open issue tfx#7768, "kubeflow_v2_entrypoint_utils fails to retrieve
classpath": TFX 1.16.0 on Kubeflow 1.8 with KFP 2.5). Pipeline spec 2.1 passes each component's
input definitions, which carry the TFX types, so this entrypoint copies the declared type onto
every input artifact that lacks a usable one and then runs TFX's entrypoint unchanged.

For a file-based ExampleGen it first runs TFX's ExampleGen driver. The compiled spec names that
driver as the container's `lifecycle.preCacheCheck` hook, which Vertex AI runs and open-source
KFP 2 does not: its driver builds the pod from the container's command and args only and decides
caching with no hook (kubeflow/pipelines backend/src/v2/driver/driver.go:309-317,
container.go:149-242, at 7b70c7b; `Lifecycle` appears only in api/v2alpha1/pipeline_spec.proto:753-768
and code generated from it, and `git log -S PreCacheCheck -- backend/src` finds no caller in any
version). Without it the CSV executor globs the literal `span-{SPAN}` pattern and
finds nothing.
"""

import os
import tempfile
from typing import List, Optional

import yaml


def _has_tfx_type(type_schema) -> bool:
    """True when TFX can map the artifact type to a Python class (a tfx.* or class-path title)."""
    kind = type_schema.WhichOneof("kind")
    if kind == "schema_title":
        title = type_schema.schema_title
    elif kind == "instance_schema":
        title = (yaml.safe_load(type_schema.instance_schema or "") or {}).get("title")
    else:
        return False
    return bool(title) and not title.startswith("system.")


def repair_input_types(executor_input, inputs_spec) -> List[str]:
    """Gives every input artifact without a TFX type the type its component declares.

    executor_input: pipeline_spec_pb2.ExecutorInput (changed in place); inputs_spec:
    pipeline_spec_pb2.ComponentInputsSpec. Returns the input keys that were repaired.
    """
    repaired = []
    for key, artifact_list in executor_input.inputs.artifacts.items():
        declared = inputs_spec.artifacts.get(key)
        if declared is None or not declared.HasField("artifact_type"):
            continue
        for artifact in artifact_list.artifacts:
            if not _has_tfx_type(artifact.type):
                artifact.type.CopyFrom(declared.artifact_type)
                repaired.append(key)
    return repaired


def is_file_based_example_gen(executor_class_path: str, executor_input) -> bool:
    """An ExampleGen executor that reads files under input_base (the ones TFX compiles with the driver hook)."""
    from tfx.components.example_gen.base_example_gen_executor import BaseExampleGenExecutor
    from tfx.types import standard_component_specs
    from tfx.utils import import_utils

    executor_class = import_utils.import_class_by_path(executor_class_path)
    return (issubclass(executor_class, BaseExampleGenExecutor)
            and standard_component_specs.INPUT_BASE_KEY in executor_input.inputs.parameter_values)


def resolve_span(executor_input, inputs_spec) -> Optional[int]:
    """Does what Vertex AI does with the preCacheCheck hook: runs TFX's file-based ExampleGen driver as
    made (it resolves {SPAN} to the newest span, the input fingerprint and the version) and applies what it
    writes to executor_input (changed in place): the exec properties (span, version, input_fingerprint,
    input_config with the resolved pattern) and the Examples artifact's properties (span). Returns the span."""
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2
    from tfx.components.example_gen import utils
    from tfx.orchestration.kubeflow.v2.file_based_example_gen import driver

    with tempfile.TemporaryDirectory() as folder:
        probe = pipeline_spec_pb2.ExecutorInput()
        probe.CopyFrom(executor_input)
        probe.outputs.output_file = os.path.join(folder, "driver_output.json")
        driver._run_driver(probe, inputs_spec)
        resolved = pipeline_spec_pb2.ExecutorOutput()
        with open(probe.outputs.output_file) as f:
            json_format.Parse(f.read(), resolved, ignore_unknown_fields=True)
    for key, value in resolved.parameter_values.items():
        executor_input.inputs.parameter_values[key].CopyFrom(value)
    for key, artifact_list in resolved.artifacts.items():
        for target, artifact in zip(executor_input.outputs.artifacts[key].artifacts, artifact_list.artifacts):
            target.metadata.update(artifact.metadata)
    return int(resolved.parameter_values[utils.SPAN_PROPERTY_NAME].number_value)


def run(args, beam_args: List[str]) -> None:
    """TFX's _run_executor on the parsed arguments, after the input types are repaired and, for a
    file-based ExampleGen, the span resolved."""
    from absl import logging
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2
    from tfx.orchestration.kubeflow.v2.container import kubeflow_v2_run_executor

    if getattr(args, "json_serialized_inputs_spec_args", None):
        executor_input = pipeline_spec_pb2.ExecutorInput()
        json_format.Parse(args.json_serialized_invocation_args, executor_input, ignore_unknown_fields=True)
        inputs_spec = pipeline_spec_pb2.ComponentInputsSpec()
        json_format.Parse(args.json_serialized_inputs_spec_args, inputs_spec, ignore_unknown_fields=True)
        repaired = repair_input_types(executor_input, inputs_spec)
        if repaired:
            logging.info("skewless: input artifact types taken from the component spec for %s", sorted(set(repaired)))
        span = None
        if is_file_based_example_gen(args.executor_class_path, executor_input):
            span = resolve_span(executor_input, inputs_spec)
            logging.info("skewless: TFX's ExampleGen driver resolved span %s", span)
        if repaired or span is not None:
            args.json_serialized_invocation_args = json_format.MessageToJson(executor_input)
    kubeflow_v2_run_executor._run_executor(args, beam_args)


def main() -> None:
    """The container's command: absl flags and logging set up as in TFX's entrypoint, then `run`."""
    from absl import app
    from tfx.orchestration.kubeflow.v2.container import kubeflow_v2_run_executor

    app.run(lambda parsed: run(*parsed), flags_parser=lambda argv: kubeflow_v2_run_executor._parse_flags(argv[1:]))


if __name__ == "__main__":
    main()
