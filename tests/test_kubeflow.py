"""Kubeflow Pipelines: the compiled spec, the container entrypoint, and submission to a stub KFP API.

The spec is compiled from configs/taxi.yaml and configs/kubeflow.yaml as `make compile` does and
checked against the DAG create_pipeline builds for the local run. The entrypoint runs a real
component (the data gate) from the compiled container arguments, fed the way the open-source
KFP launcher feeds it, and ExampleGen over local span folders, tick after tick of a recurring run.
kfp.Client talks to a local HTTP server standing in for the KFP API.
"""

import email.parser
import email.policy
import glob
import json
import os
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from tests.conftest import REPO, TAXI_SPEC

KUBEFLOW_ENV = os.path.join(REPO, "configs", "kubeflow.yaml")
IMAGE = "skewless-train:kubeflow-test"


def _env_file(tmp_path, **changes):
    with open(KUBEFLOW_ENV) as f:
        env = yaml.safe_load(f)
    env.update(changes)
    path = tmp_path / "kubeflow.yaml"
    path.write_text(yaml.safe_dump(env))
    return str(path)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(summary, PipelineSpec proto, the YAML as a dict) of the spec `make compile` writes."""
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    from pipelines import kubeflow_runner

    output = str(tmp_path_factory.mktemp("kubeflow") / "taxi_pipeline.yaml")
    summary = kubeflow_runner.compile_pipeline(TAXI_SPEC, KUBEFLOW_ENV, image=IMAGE, output=output)
    with open(output) as f:
        as_dict = yaml.safe_load(f)
    return summary, json_format.ParseDict(as_dict, pipeline_spec_pb2.PipelineSpec()), as_dict


@pytest.fixture(scope="module")
def local_dag(taxi_spec, tmp_path_factory):
    """The pipeline create_pipeline builds for LocalDagRunner (local environment defaults)."""
    from pipelines import pipeline as pipeline_lib

    root = str(tmp_path_factory.mktemp("local_dag"))
    return pipeline_lib.create_pipeline(taxi_spec, pipeline_lib.Environment(pipeline_root=root, model_repository=root))


def _kubeflow_env():
    with open(KUBEFLOW_ENV) as f:
        return yaml.safe_load(f)


# --- the compiled spec ----------------------------------------------------------------------

def test_compiled_spec_has_every_local_component_with_its_inputs_and_dependencies(compiled, local_dag):
    _, spec, _ = compiled
    tasks = spec.root.dag.tasks
    local = {node.id: node for node in local_dag.components}
    resolvers = {node_id for node_id, node in local.items() if type(node).__name__ == "Resolver"}
    # Open-source KFP runs no resolver task (configs/kubeflow.yaml: baseline none): the only node left out.
    assert resolvers and set(tasks) == set(local) - resolvers
    for node_id, task in tasks.items():
        node = local[node_id]
        assert task.component_ref.name in spec.components
        assert sorted(task.dependent_tasks) == sorted(n.id for n in node.upstream_nodes if n.id not in resolvers)
        wired = {key: (a.task_output_artifact.producer_task, a.task_output_artifact.output_artifact_key)
                 for key, a in task.inputs.artifacts.items()}
        expected = {key: (channel.producer_component_id, channel.output_key) for key, channel in node.inputs.items()
                    if channel.producer_component_id not in resolvers}
        assert wired == expected, node_id
    # The data gate still holds Transform and Trainer back although no artifact of it flows there.
    assert "data_gate" in tasks["Transform"].dependent_tasks and "data_gate" in tasks["Trainer"].dependent_tasks


def test_every_component_runs_the_training_image_with_the_profile_beam_args(compiled):
    import importlib.util

    from tfx.utils import import_utils

    _, spec, as_dict = compiled
    env = _kubeflow_env()
    with open(os.path.join(REPO, "configs", "beam", env["beam_profile"] + ".yaml")) as f:
        profile = yaml.safe_load(f)
    executors = as_dict["deploymentSpec"]["executors"]
    assert len(executors) == len(spec.root.dag.tasks)
    for label, executor in executors.items():
        container = executor["container"]
        assert container["image"] == IMAGE, label
        python, flag, module = container["command"]
        assert (python, flag) == ("python", "-m") and module.startswith("pipelines.")
        assert importlib.util.find_spec(module) is not None  # shipped in the image's pipelines/
        args = container["args"]
        # Custom components too: the @component executors import by path from components/.
        import_utils.import_class_by_path(args[args.index("--executor_class_path") + 1])
        assert f"--runner={profile['runner']}" in args
        assert f"--direct_num_workers={env['beam_vars']['workers']}" in args
        assert all(a in args for a in profile["args"] if "{" not in a)


def test_in_pod_beam_workers_hold_the_code_so_tfx_builds_no_source_package(compiled, monkeypatch):
    """configs/kubeflow.yaml's profile runs the DirectRunner in each pod, whose workers are the pod's own
    Python (apache_beam fn_runner.py:173-181), i.e. the training image. Without a dependency flag each TFX
    Beam executor would build a throwaway TFX sdist for them (base_beam_executor.py:82-84,
    dependency_utils.py:56-72); the compiled arguments name the image, so TFX's own check skips the build."""
    from tfx.orchestration.kubeflow.v2.container import kubeflow_v2_run_executor
    from tfx.utils import dependency_utils

    def build_ephemeral_package():
        raise AssertionError("TFX built its source package for Beam workers")

    monkeypatch.setattr(dependency_utils, "build_ephemeral_package", build_ephemeral_package)
    summary, _, as_dict = compiled
    assert summary["beam_args"][-1] == f"--sdk_container_image={IMAGE}"
    for label, executor in as_dict["deploymentSpec"]["executors"].items():
        _, beam_args = kubeflow_v2_run_executor._parse_flags(executor["container"]["args"])  # as the pod splits them
        assert "--runner=DirectRunner" in beam_args, label
        assert dependency_utils.make_beam_dependency_flags(beam_args) == beam_args, label
    # Runners whose workers are elsewhere keep what their profile says (dataflow, flink, spark name the image).
    from pipelines import kubeflow_runner

    flink = ["--runner=FlinkRunner", "--environment_type=EXTERNAL"]
    assert kubeflow_runner.in_pod_workers_hold_the_code(flink, IMAGE) == flink
    assert kubeflow_runner.in_pod_workers_hold_the_code([], IMAGE) == []


def test_data_folder_is_a_runtime_parameter_and_examples_are_never_cached(compiled):
    from kfp.pipeline_spec import pipeline_spec_pb2

    summary, spec, _ = compiled
    env = _kubeflow_env()
    folder = env["data_path"].format(name="taxi").rstrip("/")
    parameter = spec.root.input_definitions.parameters["data_root"]
    assert parameter.default_value.string_value == folder
    assert summary["parameters"] == ["data_root", "require_new_span"]
    example_gen = spec.root.dag.tasks["CsvExampleGen"]
    assert example_gen.inputs.parameters["input_base"].component_input_parameter == "data_root"
    assert not example_gen.caching_options.enable_cache
    assert all(t.caching_options.enable_cache for name, t in spec.root.dag.tasks.items() if name != "CsvExampleGen")
    assert spec.default_pipeline_root == env["pipeline_root"].format(name="taxi")
    # In place of the cache, the entrypoint's record of what ExampleGen ingested last, under the pipeline root,
    # and the switch a recurring run turns on (off for one-off runs).
    record = example_gen.inputs.parameters["ingested_record"].runtime_value.constant.string_value
    assert record.startswith(spec.default_pipeline_root + "/") and record.endswith(".json")
    assert example_gen.inputs.parameters["require_new_span"].component_input_parameter == "require_new_span"
    switch = spec.root.input_definitions.parameters["require_new_span"]
    assert switch.parameter_type == pipeline_spec_pb2.ParameterType.BOOLEAN and switch.default_value.bool_value is False
    declared = spec.components[example_gen.component_ref.name].input_definitions.parameters
    assert {"ingested_record", "require_new_span"} <= set(declared)
    assert spec.schema_version == "2.1.0" and spec.pipeline_info.name == "taxi"


def test_paths_in_the_spec_are_object_storage_or_inside_the_image(compiled):
    from pipelines import kubeflow_runner
    from tests.test_version_guard import _context_sources, _image, _stages

    summary, spec, _ = compiled
    with open(summary["output"]) as f:
        text = f.read()
    assert REPO not in text  # no path of this checkout leaks into what the pods run
    schema_file = spec.root.dag.tasks["ImportSchemaGen"].inputs.parameters["schema_file"].runtime_value.constant
    assert schema_file.string_value == f"{kubeflow_runner.IMAGE_ROOT}/configs/schemas/taxi.pbtxt"
    # ... and the image puts configs/ there and runs from there.
    arguments, stages = _stages((open(os.path.join(REPO, "Dockerfile.train")).read()))
    final = list(stages)[-1]
    image = _image(stages, final, arguments)
    workdirs = [rest for keyword, rest in image if keyword == "WORKDIR"]
    assert workdirs[-1] == kubeflow_runner.IMAGE_ROOT
    assert "configs/" in _context_sources(stages, final, arguments)
    pusher = json.loads(spec.root.dag.tasks["Pusher"].inputs.parameters["push_destination"].runtime_value
                        .constant.string_value)
    assert pusher["filesystem"]["base_directory"] == _kubeflow_env()["model_repository"] + "/taxi"


def test_the_local_baseline_strategy_is_refused_naming_the_key(tmp_path):
    from pipelines import kubeflow_runner

    env = _env_file(tmp_path, baseline="excluding_candidate")
    with pytest.raises(kubeflow_runner.KubeflowError, match=r"kubeflow.yaml: baseline: excluding_candidate .*cannot"):
        kubeflow_runner.compile_pipeline(TAXI_SPEC, env, image=IMAGE, output=str(tmp_path / "p.yaml"))


def test_latest_blessed_baseline_compiles_to_two_resolver_tasks_feeding_the_evaluator(tmp_path):
    from pipelines import kubeflow_runner

    env = _env_file(tmp_path, baseline="latest_blessed")
    summary = kubeflow_runner.compile_pipeline(TAXI_SPEC, env, image=IMAGE, output=str(tmp_path / "p.yaml"))
    with open(summary["output"]) as f:
        spec = yaml.safe_load(f)
    tasks, executors = spec["root"]["dag"]["tasks"], spec["deploymentSpec"]["executors"]
    resolvers = sorted(t for t in tasks if "resolver" in executors[spec["components"][t]["executorLabel"]])
    assert len(resolvers) == 2
    baseline = tasks["Evaluator"]["inputs"]["artifacts"]["baseline_model"]["taskOutputArtifact"]
    assert baseline["producerTask"] in resolvers and baseline["producerTask"] in tasks["Evaluator"]["dependentTasks"]


@pytest.mark.parametrize("changes, message", [
    (dict(pipeline_root="build/pipelines/{name}"), r"pipeline_root: 'build/pipelines/taxi' is not in object storage"),
    (dict(data_path=None), r"data_path: is required"),
    (dict(image_tag="x"), r"image_tag: unknown key"),
    (dict(baseline="newest"), r"baseline: 'newest' is not one of"),
    (dict(beam_profile="flink", beam_vars={}),
     r"flink.yaml: --flink_master=\{flink_master\}: no value for 'flink_master'"),
])
def test_environment_mistakes_name_the_file_and_key(tmp_path, changes, message):
    from components import feature_spec
    from pipelines import kubeflow_runner

    env = _env_file(tmp_path, **changes)
    with pytest.raises(feature_spec.SpecError, match=message):  # KubeflowError, or the Beam profile's error
        kubeflow_runner.compile_pipeline(TAXI_SPEC, env, image=IMAGE, output=str(tmp_path / "p.yaml"))


def test_compile_command_writes_the_yaml_and_reports_it(tmp_path, capsys):
    from pipelines import kubeflow_runner

    output = tmp_path / "out" / "spec.yaml"
    assert kubeflow_runner.main(["compile", "--image", IMAGE, "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert output.exists() and str(output.stat().st_size) in printed.replace(",", "")
    assert IMAGE in printed and "data_root" in printed
    assert kubeflow_runner.main(["compile", "--env", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read environment file" in capsys.readouterr().err


# --- the container entrypoint (tfx#7768) -----------------------------------------------------

def _gate_inputs(root, spec):
    """Statistics and anomalies artifacts that pass the data gate, on local disk."""
    from tensorflow_metadata.proto.v0 import anomalies_pb2, statistics_pb2

    kinds = {"int": statistics_pb2.FeatureNameStatistics.INT, "float": statistics_pb2.FeatureNameStatistics.FLOAT,
             "string": statistics_pb2.FeatureNameStatistics.STRING}
    stats = statistics_pb2.DatasetFeatureStatisticsList()
    dataset = stats.datasets.add(num_examples=10)
    for name, feature in spec.columns.items():
        column = dataset.features.add(type=kinds[feature.type])
        column.path.step.append(name)
        kind = column.string_stats if feature.type == "string" else column.num_stats
        kind.common_stats.num_non_missing = 10
    for split in ("train", "eval"):
        for artifact, file, message in (("anomalies", "SchemaDiff.pb", anomalies_pb2.Anomalies()),
                                        ("statistics", "FeatureStats.pb", stats)):
            folder = root / artifact / f"Split-{split}"
            folder.mkdir(parents=True)
            (folder / file).write_bytes(message.SerializeToString())
    return root / "anomalies", root / "statistics"


def _launcher_invocation(compiled, tmp_path, taxi_spec):
    """The data gate's container args, with {{$}} filled as the open-source KFP launcher fills it:
    input artifacts typed by a `system.Artifact` title, not the TFX type the spec declares."""
    _, spec, as_dict = compiled
    anomalies, statistics = _gate_inputs(tmp_path, taxi_spec)
    task = spec.root.dag.tasks["data_gate"]
    executor_input = {
        "inputs": {
            "artifacts": {key: {"artifacts": [{"name": f"projects/p/artifacts/{key}", "uri": str(uri),
                                               "type": {"schemaTitle": "system.Artifact"},
                                               "metadata": {"split_names": '["train", "eval"]', "span": 0.0}}]}
                          for key, uri in (("anomalies", anomalies), ("statistics", statistics))},
            "parameterValues": {key: p.runtime_value.constant.string_value
                                for key, p in task.inputs.parameters.items()},
        },
        "outputs": {"outputFile": str(tmp_path / "outputs" / "executor_output.json")},
    }
    label = spec.components[task.component_ref.name].executor_label
    container = as_dict["deploymentSpec"]["executors"][label]["container"]
    args = list(container["args"])
    args[args.index("{{$}}")] = json.dumps(executor_input)
    return container["command"], args, tmp_path / "outputs" / "executor_output.json"


def test_entrypoint_runs_a_custom_component_fed_as_the_open_source_launcher_feeds_it(compiled, tmp_path, taxi_spec):
    import subprocess
    import sys

    from tfx.orchestration.kubeflow.v2.container import kubeflow_v2_run_executor

    command, args, executor_output = _launcher_invocation(compiled, tmp_path, taxi_spec)
    # TFX's own entrypoint cannot even find the input's class (tfx#7768) ...
    with pytest.raises(ImportError, match="system"):
        kubeflow_v2_run_executor._run_executor(*kubeflow_v2_run_executor._parse_flags(args))
    assert not executor_output.exists()
    # ... the compiled command gives the inputs the types the spec declares, and the data gate
    # runs (in its own process, as in the pod) and passes.
    assert command[0] == "python"
    run = subprocess.run([sys.executable] + command[1:] + args, cwd=REPO, capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "input artifact types taken from the component spec for ['anomalies', 'statistics']" in run.stderr
    written = json.loads(executor_output.read_text())
    assert set(written) <= {"artifacts", "parameterValues"}


def test_entrypoint_repairs_only_inputs_without_a_tfx_type(compiled):
    from kfp.pipeline_spec import pipeline_spec_pb2

    from pipelines import kubeflow_entrypoint

    _, spec, _ = compiled
    declared = spec.components["Trainer"].input_definitions
    executor_input = pipeline_spec_pb2.ExecutorInput()
    typed = executor_input.inputs.artifacts["examples"].artifacts.add(uri="gs://b/e")
    typed.type.CopyFrom(declared.artifacts["examples"].artifact_type)
    executor_input.inputs.artifacts["schema"].artifacts.add(uri="gs://b/s")  # no type at all
    empty = executor_input.inputs.artifacts["transform_graph"].artifacts.add(uri="gs://b/t")
    empty.type.instance_schema = ""
    assert sorted(kubeflow_entrypoint.repair_input_types(executor_input, declared)) == ["schema", "transform_graph"]
    for key in ("examples", "schema", "transform_graph"):
        assert executor_input.inputs.artifacts[key].artifacts[0].type == declared.artifacts[key].artifact_type


# --- spans: {SPAN} resolved in the pod, the window refused ---------------------------------

SPANS_DATA = "build/spans/span-{SPAN}/"  # what make export-span writes; the spans of a spans spec


@pytest.fixture(scope="module")
def compiled_spans(taxi_spec, tmp_path_factory):
    """(printed, PipelineSpec as a dict, header lines, the local DAG with the same baseline) of taxi with
    data.path holding {SPAN}, compiled by the compile command."""
    import contextlib
    import dataclasses
    import io

    from components import feature_spec
    from pipelines import kubeflow_runner
    from pipelines import pipeline as pipeline_lib

    spans = dataclasses.replace(taxi_spec, data_path=feature_spec.resolve_path(SPANS_DATA))
    output = tmp_path_factory.mktemp("kubeflow_spans") / "spans.yaml"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(kubeflow_runner.feature_spec, "load", lambda path: spans)
        assert kubeflow_runner.main(["compile", "--image", IMAGE, "--output", str(output)]) == 0
    text = output.read_text()
    root = str(tmp_path_factory.mktemp("local_spans"))
    local = pipeline_lib.create_pipeline(spans, pipeline_lib.Environment(pipeline_root=root, model_repository=root,
                                                                         baseline=_kubeflow_env()["baseline"]))
    return (printed.getvalue(), yaml.safe_load(text), [line for line in text.splitlines() if line.startswith("#")],
            local)


def test_a_spans_spec_keeps_its_pattern_under_the_data_root_and_says_what_is_local_only(compiled_spans):
    printed, spec, header, local = compiled_spans
    tasks = spec["root"]["dag"]["tasks"]
    example_gen = tasks["CsvExampleGen"]["inputs"]["parameters"]
    folder = _kubeflow_env()["data_path"].format(name="taxi").rstrip("/")
    assert spec["root"]["inputDefinitions"]["parameters"]["data_root"]["defaultValue"] == folder
    assert example_gen["input_base"] == {"componentInputParameter": "data_root"}
    splits = json.loads(example_gen["input_config"]["runtimeValue"]["constant"])["splits"]
    assert splits == [{"name": "single_split", "pattern": "span-{SPAN}/*.csv"}]
    # The newest span, as pipelines/pipeline.py asks locally: RollingRange(num_spans=1).
    assert json.loads(example_gen["range_config"]["runtimeValue"]["constant"]) == {
        "rolling_range": {"num_spans": 1}}
    # Training reads the newest span, as the local DAG does without data.rolling_spans; the one custom
    # resolver of that DAG (the previous span's statistics) is left out and said to be.
    transform_examples = tasks["Transform"]["inputs"]["artifacts"]["examples"]["taskOutputArtifact"]
    assert transform_examples["producerTask"] == "CsvExampleGen"
    assert set(tasks) == {node.id for node in local.components} - {"previous_span_statistics"}
    assert set(tasks["data_gate"]["inputs"]["artifacts"]) == {"anomalies", "statistics"}  # no drift check
    # No window, so no analyzer cache: Transform neither reads one nor writes one.
    assert "analyzer_cache" not in tasks["Transform"]["inputs"]["artifacts"]
    assert set(spec["components"]["Transform"]["outputDefinitions"]["artifacts"]) == {"transform_graph",
                                                                                      "transformed_examples"}
    assert "local only, not in the compiled pipeline: the data gate's span-to-span drift check" in printed
    assert any(line.startswith("# local only: the rolling window and Transform's analyzer cache") for line in header)


def test_the_rolling_window_is_refused_naming_the_key_the_file_and_the_line(taxi_spec, tmp_path, monkeypatch):
    import dataclasses

    from components import feature_spec
    from pipelines import kubeflow_runner

    source = tmp_path / "spans.yaml"
    source.write_text("name: taxi\ndata:\n  path: build/spans/span-{SPAN}/\n  rolling_spans: 3\n")
    window = dataclasses.replace(taxi_spec, source=str(source), data_path=feature_spec.resolve_path(SPANS_DATA),
                                 rolling_spans=3)
    monkeypatch.setattr(kubeflow_runner.feature_spec, "load", lambda path: window)
    with pytest.raises(kubeflow_runner.KubeflowError,
                       match=rf"^{re.escape(str(source))}: data.rolling_spans: 3: .*SpanRangeStrategy.*"
                             rf"spec without data.rolling_spans.*\({re.escape(str(source))}:4\)$"):
        kubeflow_runner.compile_pipeline(str(source), KUBEFLOW_ENV, image=IMAGE, output=str(tmp_path / "p.yaml"))
    one_file = _env_file(tmp_path, data_path="gs://b/data/taxi.csv")
    monkeypatch.setattr(kubeflow_runner.feature_spec, "load", lambda path: dataclasses.replace(window, rolling_spans=1))
    with pytest.raises(kubeflow_runner.KubeflowError, match=r"kubeflow.yaml: data_path: 'gs://b/data/taxi.csv' is "
                                                            r"one file, but .* reads spans"):
        kubeflow_runner.compile_pipeline(str(source), one_file, image=IMAGE, output=str(tmp_path / "p.yaml"))


def test_a_window_as_a_union_of_one_example_gen_per_span_does_not_compile_for_kubeflow(tmp_path):
    """Why data.rolling_spans > 1 stays refused (issue 12, point 5). The route without a resolver: N ExampleGen
    tasks (N is known at compile time), task k ingesting span newest - k, and Transform reading the union of
    their outputs. TFX 1.16's KubeflowV2 step builder takes one Channel per input and raises on a union
    (tfx/orchestration/kubeflow/v2/step_builder.py:360-365, "Only single Channel is supported"); KFP's IR has
    one producer per task input (kubeflow/pipelines@7b70c7b api/v2alpha1/pipeline_spec.proto:280-298), and a
    DAG output with several artifact selectors is resolved as dsl.OneOf, the first branch that completed
    (backend/src/v2/driver/resolve.go:1057-1085); only a ParallelFor's dsl.Collected yields a list
    (resolve.go:867-995; artifacts since KFP 2.14, kubeflow/pipelines#11725), which TFX's compiler never emits. A fixed task per span would also fail on a gap in
    the span numbers (a StaticRange on a missing span matches no file), where TFX's window shortens.
    If a TFX upgrade compiles the union, this test fails: the route is then open."""
    from tfx.components import CsvExampleGen, StatisticsGen
    from tfx.orchestration import pipeline
    from tfx.orchestration.kubeflow.v2 import kubeflow_v2_dag_runner
    from tfx.types import channel

    newest, previous = (CsvExampleGen(input_base=str(tmp_path)).with_id(f"span_{k}") for k in ("newest", "previous"))
    window = StatisticsGen(examples=channel.union([newest.outputs["examples"], previous.outputs["examples"]]))
    union = pipeline.Pipeline(pipeline_name="window", pipeline_root="gs://b/root", components=[newest, previous, window])
    runner = kubeflow_v2_dag_runner.KubeflowV2DagRunner(
        kubeflow_v2_dag_runner.KubeflowV2DagRunnerConfig(default_image=IMAGE))
    with pytest.raises(TypeError, match="^Only single Channel is supported.$"):
        runner.run(union, write_out=False)


def test_a_resolver_kubeflow_cannot_compile_is_refused_by_name(local_dag):
    from pipelines import kubeflow_runner

    # The local DAG's baseline resolver (BaselineModelStrategy) is custom: named, not left to TFX's TypeError.
    with pytest.raises(kubeflow_runner.KubeflowError, match=r"env.yaml: resolver 'latest_blessed_model_resolver' "
                                                            r"\(BaselineModelStrategy\) cannot be compiled"):
        kubeflow_runner.check_compilable(local_dag, "env.yaml")


def _example_gen_invocation(compiled_spans, data_root, output_root, record, require_new_span=False):
    """CsvExampleGen's container args with {{$}} filled as the open-source KFP driver fills it: the
    data_root and require_new_span parameters, the output artifact typed by the component's output
    definition (kubeflow/pipelines backend/src/v2/driver/driver.go:770-782, provisionOutputs); the
    compiled record (on object storage) moved to the local `record`."""
    _, spec, _, _ = compiled_spans
    task = spec["root"]["dag"]["tasks"]["CsvExampleGen"]
    component = spec["components"][task["componentRef"]["name"]]
    values = {key: parameter["runtimeValue"]["constant"] for key, parameter in task["inputs"]["parameters"].items()
              if "runtimeValue" in parameter}
    assert values["ingested_record"].startswith(spec["defaultPipelineRoot"] + "/")
    executor_input = {
        "inputs": {"parameterValues": {**values, "input_base": str(data_root), "ingested_record": str(record),
                                       "require_new_span": require_new_span}},
        "outputs": {"artifacts": {key: {"artifacts": [{"name": key, "uri": str(output_root / key),
                                                       "type": output["artifactType"]}]}
                                  for key, output in component["outputDefinitions"]["artifacts"].items()},
                    "outputFile": str(output_root / "executor_output.json")},
    }
    container = spec["deploymentSpec"]["executors"][component["executorLabel"]]["container"]
    args = list(container["args"])
    args[args.index("{{$}}")] = json.dumps(executor_input)
    return args, output_root / "executor_output.json"


def test_the_pod_ingests_the_newest_span_as_tfxs_driver_resolves_it(compiled_spans, taxi_spec, tmp_path):
    """Open-source KFP 2 never runs the compiled lifecycle.preCacheCheck (TFX's file-based ExampleGen
    driver): kubeflow/pipelines@7b70c7b backend/src/v2/driver/driver.go:309-317 starts the pod from the
    container's command and args only, container.go:149-242 decides caching with no hook, and `Lifecycle`
    is read nowhere in backend/ (only api/v2alpha1/pipeline_spec.proto:753-768 defines it). So the
    entrypoint runs the driver itself; without it TFX's CSV executor globs the literal pattern
    (tfx/components/example_gen/csv_example_gen/executor.py:181-184)."""
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2
    from tfx.orchestration.kubeflow.v2.container import kubeflow_v2_run_executor
    from tfx.types.artifact import CUSTOM_PROPERTIES_PREFIX

    from pipelines import kubeflow_entrypoint
    from tests.conftest import read_rows, taxi_csv_path

    rows = read_rows(taxi_csv_path(taxi_spec), limit=12)
    spans = {1: rows[:3], 2: rows[3:7], 10: rows[7:]}  # span 10 is the newest: numbers, not text, order them
    for span, span_rows in spans.items():
        _write_span(tmp_path / "data", span, span_rows)
    record = tmp_path / "root" / "ingested.json"

    args, executor_output = _example_gen_invocation(compiled_spans, tmp_path / "data", tmp_path / "tfx_alone", record)
    with pytest.raises(RuntimeError, match=r"span-\{SPAN\}/\*.csv does not match any files"):
        kubeflow_v2_run_executor._run_executor(kubeflow_v2_run_executor._parse_flags(args)[0], IN_MEMORY)

    args, executor_output = _example_gen_invocation(compiled_spans, tmp_path / "data", tmp_path / "out", record)
    parsed, _ = kubeflow_v2_run_executor._parse_flags(args)
    executor_input = pipeline_spec_pb2.ExecutorInput()
    json_format.Parse(parsed.json_serialized_invocation_args, executor_input)
    inputs_spec = pipeline_spec_pb2.ComponentInputsSpec()
    json_format.Parse(parsed.json_serialized_inputs_spec_args, inputs_spec)
    kubeflow_entrypoint.take_own_parameters(executor_input)
    assert kubeflow_entrypoint.resolve_span(executor_input, inputs_spec) == 10
    values = executor_input.inputs.parameter_values
    assert json.loads(values["input_config"].string_value)["splits"][0]["pattern"] == "span-10/*.csv"
    assert values["input_fingerprint"].string_value.startswith("split:single_split,num_files:1,")

    kubeflow_entrypoint.run(parsed, IN_MEMORY)
    written = json.loads(executor_output.read_text())
    (examples,) = written["artifacts"]["examples"]["artifacts"]
    # TFX's driver sets span as a custom property (example_gen/driver.py:39-62, as LocalDagRunner does);
    # its name is also a property of Examples, so TFX's entrypoint writes it with the custom-property
    # prefix (kubeflow_v2_entrypoint_utils.py:213-227).
    assert examples["metadata"][CUSTOM_PROPERTIES_PREFIX + "span"] == 10
    assert _fares(tmp_path / "out" / "examples") == pytest.approx(sorted(float(r["fare"]) for r in spans[10]))


# One Beam process here; a container image named, so that TFX does not build a tfx sdist for workers.
IN_MEMORY = ["--runner=DirectRunner", "--direct_running_mode=in_memory", f"--sdk_container_image={IMAGE}"]


def _write_span(data_root, span, rows):
    folder = data_root / f"span-{span}"
    folder.mkdir(parents=True, exist_ok=True)
    header = list(rows[0])
    with open(folder / "data.csv", "w") as f:
        f.write(",".join(header) + "\n" + "".join(",".join(r[c] for c in header) + "\n" for r in rows))
    return folder / "data.csv"


def _fares(examples):
    """The sorted fares of the Examples artifact at `examples` (every split)."""
    import tensorflow as tf

    records = [tf.train.Example.FromString(r.numpy()) for f in glob.glob(str(examples / "Split-*" / "*.gz"))
               for r in tf.data.TFRecordDataset(f, compression_type="GZIP")]
    return sorted(e.features.feature["fare"].float_list.value[0] for e in records)


def test_a_recurring_run_that_finds_no_new_span_stops_before_ingesting_it_again(compiled_spans, taxi_spec,
                                                                                tmp_path, capsys, monkeypatch):
    """Issue 12 point 5, never the same data again, on Kubeflow. On Vertex AI the span, version and
    fingerprint TFX's driver resolves become execution properties before the cache check
    (tfx/orchestration/kubeflow/v2/file_based_example_gen/driver.py:46-52, 95-103), so unchanged files
    reuse old examples; open-source KFP runs no such hook and ExampleGen is never cached, so the
    entrypoint compares them with its record and stops a recurring run (require_new_span) with exit 3,
    as make retrain does locally (pipelines/local_runner.py)."""
    from tfx.orchestration.kubeflow.v2.container import kubeflow_v2_run_executor
    from tfx.utils import import_utils

    from pipelines import kubeflow_entrypoint
    from tests.conftest import read_rows, taxi_csv_path

    rows = read_rows(taxi_csv_path(taxi_spec), limit=14)
    data, record = tmp_path / "data", tmp_path / "root" / "skewless" / "CsvExampleGen_ingested.json"

    def tick(name, require_new_span=True):
        args, executor_output = _example_gen_invocation(compiled_spans, data, tmp_path / name, record,
                                                        require_new_span)
        return kubeflow_v2_run_executor._parse_flags(args)[0], executor_output

    def fares(span_rows):
        return pytest.approx(sorted(float(r["fare"]) for r in span_rows))

    _write_span(data, 4, rows[:4])
    parsed, _ = tick("first")
    assert not record.exists()
    assert kubeflow_entrypoint.exit_code(parsed, IN_MEMORY) == 0
    first = json.loads(record.read_text())
    assert first["data"]["span"] == 4 and first["data"]["input_base"] == str(data)
    assert first["data"]["input_config"]["splits"][0]["pattern"] == "span-4/*.csv"
    assert first["examples"] == str(tmp_path / "first" / "examples")
    assert _fares(tmp_path / "first" / "examples") == fares(rows[:4])
    assert [p.name for p in record.parent.iterdir()] == [record.name]  # written beside it, renamed over it

    # Nothing new: stopped after the driver, before the executor writes anything; the record stays.
    parsed, executor_output = tick("second")
    assert kubeflow_entrypoint.exit_code(parsed, IN_MEMORY) == kubeflow_entrypoint.NOTHING_NEW_EXIT == 3
    message = capsys.readouterr().err
    assert f"nothing new under {data}: span 4 (the newest) was ingested by this pipeline at {first['ingested_at']}" \
        in message and str(record) in message and "make export-span" in message and "make submit" in message
    assert not (tmp_path / "second").exists() and not executor_output.exists()
    assert json.loads(record.read_text()) == first

    # Two spans arrive between ticks: the newest is ingested (span 5 is never trained on, as without a
    # window locally); then a file of it is rewritten: a new fingerprint, new data, ingested again.
    _write_span(data, 5, rows[4:7])
    csv = _write_span(data, 6, rows[7:10])
    assert kubeflow_entrypoint.exit_code(tick("third")[0], IN_MEMORY) == 0
    third = json.loads(record.read_text())
    assert third["data"]["span"] == 6 and _fares(tmp_path / "third" / "examples") == fares(rows[7:10])
    stamp = os.stat(csv).st_mtime
    _write_span(data, 6, rows[7:12])
    os.utime(csv, (stamp + 60, stamp + 60))  # TFX's fingerprint counts whole seconds
    assert kubeflow_entrypoint.exit_code(tick("fourth")[0], IN_MEMORY) == 0
    fourth = json.loads(record.read_text())
    assert fourth["data"]["span"] == 6 and fourth["data"]["input_fingerprint"] != third["data"]["input_fingerprint"]
    assert _fares(tmp_path / "fourth" / "examples") == fares(rows[7:12])

    # A failed ingestion leaves the record as it was, so the next tick finds the data new and tries again:
    # a one-off run (make submit: no require_new_span) reaches the executor on the span ingested last, and
    # so does a tick that finds a new span.
    def disk_full(self, input_dict, output_dict, exec_properties):
        raise OSError("No space left on device")

    for name, require_new_span in (("one_off", False), ("failed", True)):
        if require_new_span:
            _write_span(data, 7, rows[12:])
        parsed, executor_output = tick(name, require_new_span)
        monkeypatch.setattr(import_utils.import_class_by_path(parsed.executor_class_path), "Do", disk_full)
        with pytest.raises(OSError, match="No space left"):
            kubeflow_entrypoint.exit_code(parsed, IN_MEMORY)
        assert json.loads(record.read_text()) == fourth and not executor_output.exists()


def test_a_record_that_is_not_one_names_the_file_and_the_fix(tmp_path):
    from pipelines import kubeflow_entrypoint

    record = tmp_path / "ingested.json"
    assert kubeflow_entrypoint.read_record(str(record)) is None  # no record yet: the first run ingests
    record.write_text('{"span": 3}')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(record))}: not a record .*'data'.*; delete it"):
        kubeflow_entrypoint.read_record(str(record))


# --- the sandbox on object storage ----------------------------------------------------------

def test_sandbox_takes_its_candidate_and_examples_from_object_storage_and_writes_back(tmp_path):
    """On Kubeflow the model, the examples and the blessing are gs:// URIs; the local server reads
    local files. TensorFlow's ram:// file system stands in for the bucket."""
    import uuid

    import tensorflow as tf

    from components import sandbox

    bucket = f"ram://bucket-{uuid.uuid4().hex}"
    model = f"{bucket}/Trainer/model/7/Format-Serving"
    files = {"saved_model.pb": b"graph", "variables/variables.index": b"index", "assets/vocab.txt": b"Cash\nCredit"}
    for name, data in files.items():
        tf.io.gfile.makedirs(os.path.dirname(f"{model}/{name}"))
        with tf.io.gfile.GFile(f"{model}/{name}", "wb") as f:
            f.write(data)
    local = sandbox.local_model_dir(model, str(tmp_path))
    assert local.startswith(str(tmp_path))
    assert {name: open(os.path.join(local, name), "rb").read() for name in files} == files
    assert sandbox.local_model_dir(local, str(tmp_path / "unused")) == local  # local disk: used where it is
    warmed = f"{bucket}/sandbox_validator/blessing/9/stamped_model"
    warmup = sandbox.write_warmed_model(local, warmed, [b"request-1", b"request-2"])
    assert warmup.startswith(warmed + "/")
    assert [r.numpy() for r in tf.data.TFRecordDataset(warmup)] == [b"request-1", b"request-2"]
    assert all(tf.io.gfile.GFile(f"{warmed}/{name}", "rb").read() == data for name, data in files.items())
    examples = f"{bucket}/CsvExampleGen/examples/3"
    tf.io.gfile.makedirs(f"{examples}/Split-eval")
    rows = [tf.train.Example(features=tf.train.Features(feature={"fare": tf.train.Feature(
        float_list=tf.train.FloatList(value=[float(i)]))})).SerializeToString() for i in range(5)]
    with tf.io.TFRecordWriter(f"{examples}/Split-eval/data_tfrecord-00000-of-00001.gz", "GZIP") as writer:
        for row in rows:
            writer.write(row)
    assert sandbox.read_examples(examples, "eval", 3) == rows[:3]


# --- submission and scheduling against a stand-in KFP API ------------------------------------

class KfpStub(ThreadingHTTPServer):
    """Answers the KFP v2beta1 REST calls kfp.Client makes; records each request."""

    def __init__(self, existing_pipeline=False):
        super().__init__(("127.0.0.1", 0), _KfpHandler)
        self.requests = []
        self.pipelines = {"p-1": "taxi"} if existing_pipeline else {}
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def host(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def calls(self, method, path):
        return [r for r in self.requests if r["method"] == method and r["path"] == path]


class _KfpHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _handle(self, method):
        url = urllib.parse.urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        record = {"method": method, "path": url.path, "query": urllib.parse.parse_qs(url.query), "json": None,
                  "files": {}}
        if body and self.headers.get_content_type() == "multipart/form-data":
            message = email.parser.BytesParser(policy=email.policy.default).parsebytes(
                b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body)
            record["files"] = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                               for part in message.iter_parts()}
        elif body:
            record["json"] = json.loads(body)
        self.server.requests.append(record)
        status, answer = self._answer(method, url.path, record)
        payload = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _answer(self, method, path, record):
        stub = self.server
        if (method, path) == ("GET", "/apis/v2beta1/healthz"):
            return 200, {"multi_user": False}
        if (method, path) == ("GET", "/apis/v2beta1/pipelines"):
            wanted = json.loads(record["query"]["filter"][0])["predicates"][0]["stringValue"]
            found = [{"pipeline_id": i, "display_name": n} for i, n in stub.pipelines.items() if n == wanted]
            return 200, {"pipelines": found, "total_size": len(found)} if found else {}
        if (method, path) == ("POST", "/apis/v2beta1/pipelines/upload"):
            stub.pipelines["p-1"] = record["query"]["name"][0]
            return 200, {"pipeline_id": "p-1", "display_name": record["query"]["name"][0]}
        if (method, path) == ("GET", "/apis/v2beta1/pipelines/p-1/versions"):
            return 200, {"pipeline_versions": [{"pipeline_id": "p-1", "pipeline_version_id": "v-1"}], "total_size": 1}
        if (method, path) == ("POST", "/apis/v2beta1/pipelines/upload_version"):
            return 200, {"pipeline_id": record["query"]["pipelineid"][0], "pipeline_version_id": "v-2",
                         "display_name": record["query"]["name"][0]}
        if (method, path) == ("GET", "/apis/v2beta1/experiments"):
            return 200, {}
        if (method, path) == ("POST", "/apis/v2beta1/experiments"):
            return 200, {"experiment_id": "e-1", "display_name": record["json"]["display_name"]}
        if (method, path) == ("POST", "/apis/v2beta1/runs"):
            return 200, {"run_id": "r-1", **record["json"]}
        if (method, path) == ("POST", "/apis/v2beta1/recurringruns"):
            return 200, {"recurring_run_id": "rr-1", **record["json"]}
        return 404, {"error": f"no {method} {path} in this stub"}

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")


@pytest.fixture
def kfp_api(request):
    stub = KfpStub(existing_pipeline=getattr(request, "param", False))
    stub.thread.start()
    yield stub
    stub.shutdown()
    stub.server_close()


def test_submit_uploads_the_compiled_spec_and_starts_a_run_on_it(compiled, kfp_api, capsys):
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    from pipelines import kubeflow_runner

    summary, spec, _ = compiled
    code = kubeflow_runner.main(["submit", "--host", kfp_api.host, "--experiment", "nightly",
                                 "--package", summary["output"]])
    assert code == 0, capsys.readouterr().err
    (upload,) = kfp_api.calls("POST", "/apis/v2beta1/pipelines/upload")
    assert upload["query"]["name"] == ["taxi"]
    uploaded = json_format.ParseDict(yaml.safe_load(upload["files"]["uploadfile"]), pipeline_spec_pb2.PipelineSpec())
    assert uploaded == spec
    (experiment,) = kfp_api.calls("POST", "/apis/v2beta1/experiments")
    assert experiment["json"]["display_name"] == "nightly"
    (run,) = kfp_api.calls("POST", "/apis/v2beta1/runs")
    assert run["json"]["experiment_id"] == "e-1"
    assert run["json"]["pipeline_version_reference"] == {"pipeline_id": "p-1", "pipeline_version_id": "v-1"}
    assert run["json"]["runtime_config"]["pipeline_root"] == spec.default_pipeline_root
    assert not run["json"]["runtime_config"].get("parameters")  # a one-off run may train on data seen before
    assert "pipeline_spec" not in run["json"]  # the run points at the uploaded version
    assert f"{kfp_api.host}/#/runs/details/r-1" in capsys.readouterr().out


@pytest.mark.parametrize("kfp_api", [True], indirect=True)
def test_schedule_adds_a_version_and_a_recurring_run_with_the_cron(compiled, kfp_api, capsys):
    from pipelines import kubeflow_runner

    summary, spec, _ = compiled
    code = kubeflow_runner.main(["schedule", "--host", kfp_api.host, "--cron", "0 3 * * *",
                                 "--package", summary["output"]])
    assert code == 0, capsys.readouterr().err
    assert kfp_api.calls("POST", "/apis/v2beta1/pipelines/upload") == []  # the pipeline exists: a new version
    (version,) = kfp_api.calls("POST", "/apis/v2beta1/pipelines/upload_version")
    assert version["query"]["pipelineid"] == ["p-1"]
    assert version["files"]["uploadfile"] == open(summary["output"], "rb").read()
    from pipelines import fingerprint

    commit = fingerprint.code_commit()  # the local runner's tag rule: one rule for both runners
    stamp, _, named = version["query"]["name"][0].partition("Z-")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d", stamp)
    assert named == commit[:12] + ("+uncommitted" if commit.endswith("+uncommitted") else "")
    (recurring,) = kfp_api.calls("POST", "/apis/v2beta1/recurringruns")
    body = recurring["json"]
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}  # KFP's six fields, seconds first
    assert body["pipeline_version_reference"] == {"pipeline_id": "p-1", "pipeline_version_id": "v-2"}
    assert body["mode"] == "ENABLE" and int(body["max_concurrency"]) == 1 and body["no_catchup"] is True
    assert body["runtime_config"]["pipeline_root"] == spec.default_pipeline_root
    assert body["runtime_config"]["parameters"] == {"require_new_span": True}  # never the same data again
    assert f"{kfp_api.host}/#/recurringrun/details/rr-1" in capsys.readouterr().out


@pytest.mark.parametrize("cron, expected", [("0 0 3 * * *", "0 0 3 * * *"), ("30 2 * * 1-5", "0 30 2 * * 1-5"),
                                            ("@daily", "@daily")])
def test_cron_expressions_become_kfps_six_fields(cron, expected):
    from pipelines import kubeflow_runner

    assert kubeflow_runner.kfp_cron(cron) == expected


def test_a_malformed_cron_is_refused_before_anything_is_uploaded(kfp_api, capsys):
    from pipelines import kubeflow_runner

    assert kubeflow_runner.main(["schedule", "--host", kfp_api.host, "--cron", "3 * *", "--package", "x.yaml"]) == 2
    assert "--cron '3 * *'" in capsys.readouterr().err and kfp_api.requests == []
