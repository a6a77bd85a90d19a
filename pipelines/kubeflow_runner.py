"""Compiles the pipeline for Kubeflow Pipelines 2, submits it, schedules it.

    python -m pipelines.kubeflow_runner compile  [--spec configs/taxi.yaml] [--env configs/kubeflow.yaml]
                                                 [--image IMAGE] [--beam_profile NAME] [--output PATH]
    python -m pipelines.kubeflow_runner submit   --host KFP_HOST [--experiment NAME] [--package PATH]
    python -m pipelines.kubeflow_runner schedule --host KFP_HOST --cron CRON [--experiment NAME]

The DAG is pipelines.pipeline.create_pipeline(spec, env), the one LocalDagRunner runs. TFX's
KubeflowV2DagRunner compiles it into a KFP v2 PipelineSpec, written as YAML to
build/kubeflow/<name>_pipeline.yaml. The environment file (configs/kubeflow.yaml) puts the pipeline
root, the data and the model repository in object storage and names the training image
(Dockerfile.train) and the Beam profile (configs/beam/). `submit` and `schedule` compile first
unless --package names a compiled file, upload it as a new version of the pipeline and start a run
or a recurring run (continuous retraining) on that version with kfp.Client.

What the compiled spec does differently from the local run, and why:
  * No baseline resolver by default (`baseline: none`): KubeflowV2DagRunner compiles TFX's two
    stock resolver strategies only (BaselineModelStrategy, the local one, is custom), and the
    open-source KFP 2 backend runs no resolver task at all ("resolver executors not
    implemented"). Change thresholds are then skipped; value thresholds still gate the push.
    `baseline: latest_blessed` compiles TFX's LatestBlessedModelStrategy, for Vertex AI.
  * Every component starts through pipelines.kubeflow_entrypoint (see there, tfx#7768) and the
    spec uses schema 2.1, whose parameter types the KFP 2 backend reads.
  * CsvExampleGen is never cached: KFP's cache key holds the parameters, not the files, and TFX's
    ExampleGen driver that fingerprints the files is a pre-cache hook only Vertex AI runs, so a
    scheduled run over a folder that received new CSVs would otherwise reuse the old examples.
    The entrypoint runs that driver in the pod instead, so {SPAN} resolves to the newest span, and
    a recurring run (require_new_span) stops there when that span's files are the ones ExampleGen
    ingested last (the record under the pipeline root): never the same data again.
  * The data folder is a runtime parameter (`data_root`), so a run can read another drop of
    data without recompiling. With {SPAN} in the spec's data.path, the span folders sit under it.
  * With spans, the local DAG's custom resolvers are not compiled: data.rolling_spans > 1 is
    refused (the window), and the data gate's span-to-span drift check is left out and said to be
    (LOCAL_ONLY_WITH_SPANS): each Kubeflow run trains on and checks the newest span.
"""

import argparse
import dataclasses
import datetime
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

import yaml

from components import feature_spec
from pipelines import beam_profiles, environment, fingerprint, kubeflow_entrypoint

DEFAULT_ENV = "configs/kubeflow.yaml"
BUILD_DIR = os.path.join(feature_spec.REPO_ROOT, "build", "kubeflow")
# Where Dockerfile.train copies the repository's code and configs (its WORKDIR and PYTHONPATH).
IMAGE_ROOT = "/pipeline"
ENTRYPOINT = ("python", "-m", "pipelines.kubeflow_entrypoint")
DATA_ROOT_PARAMETER = "data_root"
# What a spans spec does locally and the compiled pipeline does not (custom resolvers, which open-source
# KFP would not run): said in the compile output and in the compiled file's header.
LOCAL_ONLY_WITH_SPANS = (
    "the data gate's span-to-span drift check (previous_span_statistics, a custom resolver): each run's "
    "span is checked against the schema only",
    "the rolling window and Transform's analyzer cache across spans (rolling_spans, "
    "previous_analyzer_cache): each run trains on the newest span, analyzed in full")


class KubeflowError(feature_spec.SpecError):
    """An environment or a request the Kubeflow runner cannot use; the message names the key."""


# --- environment ----------------------------------------------------------------------------

def load_environment(path: str, spec) -> Dict:
    """configs/kubeflow.yaml, read and checked by its typed model (pipelines/environment.py)."""
    return environment.load_kubeflow_environment(path, spec)


def kfp_pipeline_name(name: str) -> str:
    """The spec's name as KFP accepts it: lower case, digits and hyphens ([a-z0-9][a-z0-9-]*)."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if not cleaned:
        raise KubeflowError(f"spec name '{name}' leaves nothing KFP accepts as a pipeline name")
    return cleaned[:128]


def image_path(path: str, source: str, key: str) -> str:
    """A repository file's path inside the training image (Dockerfile.train copies configs/ there)."""
    if "://" in path:
        return path
    relative = os.path.relpath(os.path.abspath(path), feature_spec.REPO_ROOT)
    if relative.startswith(".."):
        raise KubeflowError(f"{source}: {key}: '{path}' is outside the repository, so the training image does not "
                            f"hold it; put it under configs/ or in object storage")
    return f"{IMAGE_ROOT}/{relative}"


def spec_for_image(spec, data_path: str, env_source: str = DEFAULT_ENV):
    """The spec as the pods see it: data from object storage, the schema and source inside the image.

    With {SPAN} in the spec's data.path, the environment's data_path is the folder holding the span
    folders, and the spec's span pattern (pipelines.pipeline.data_folder's) is kept under it: the
    environment moves the data, it does not turn a spans spec into a one-folder spec."""
    if spec.has_spans:
        from pipelines import pipeline as pipeline_lib

        if not data_path.endswith("/"):
            raise KubeflowError(f"{env_source}: data_path: '{data_path}' is one file, but {spec.source} reads spans "
                                f"(data.path '{spec.raw.get('data', {}).get('path', spec.data_path)}'): give the "
                                f"folder that holds the span folders, with a trailing slash (e.g. "
                                f"gs://bucket/data/{{name}}/)")
        data_path = data_path + pipeline_lib.data_folder(spec)[1]
    return dataclasses.replace(
        spec, data_path=data_path, source=image_path(spec.source, spec.source, "source"),
        schema_path=image_path(spec.schema_path, spec.source, "schema") if spec.schema_path else None)


def refuse_rolling_window(spec) -> None:
    """A window of spans (data.rolling_spans > 1) is a resolver node, TFX's SpanRangeStrategy, which
    KubeflowV2DagRunner cannot compile: compiled, the window would be gone and Kubeflow would train
    on another window than the local run. Refused before anything is compiled. One ExampleGen task per
    span with Transform reading their union does not compile either (TFX's step builder takes one
    Channel per input, and KFP's IR has no union of task outputs; tests/test_kubeflow.py cites both)."""
    if not spec.has_spans or (spec.rolling_spans or 1) == 1:
        return
    line = feature_spec.read_yaml(spec.source)[1].get(("data", "rolling_spans"))
    raise KubeflowError(
        f"{spec.source}: data.rolling_spans: {spec.rolling_spans}: the window of spans is a resolver (TFX's "
        f"SpanRangeStrategy) that KubeflowV2DagRunner cannot compile and open-source Kubeflow Pipelines "
        f"runs no resolver task, so a Kubeflow run would train on the newest span alone; for Kubeflow use a "
        f"spec without data.rolling_spans (each run trains on the newest span), or run the window locally "
        f"(make retrain)" + (f" ({spec.source}:{line})" if line else ""))


def in_pod_workers_hold_the_code(beam_args: List[str], image: str) -> List[str]:
    """The Beam arguments with the training image named when the DirectRunner runs the workers in the pod.

    Given Beam arguments that name no dependency, every TFX Beam executor builds a source package of
    TFX for remote workers (tfx/dsl/components/base/base_beam_executor.py:82-84 calls
    tfx/utils/dependency_utils.py:56-72, which skips the build only when extra_packages, setup_file,
    requirements_file, worker_harness_container_image or sdk_container_image is set). The DirectRunner's
    workers are the pod's own Python (apache_beam/runners/portability/fn_api_runner/fn_runner.py:173-181:
    in process, or `sys.executable -m apache_beam.runners.worker.sdk_worker_main` subprocesses), so they
    run the training image and never install the package: naming the image (which the DirectRunner does
    not read) is true and stops the build. Other runners' profiles name it themselves (configs/beam/)."""
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions, WorkerOptions

    if not beam_args:  # TFX builds nothing without arguments
        return []
    options = PipelineOptions(beam_args)
    runner = options.view_as(StandardOptions).runner or StandardOptions.DEFAULT_RUNNER
    if runner.split(".")[-1] not in ("DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner") \
            or options.view_as(WorkerOptions).sdk_container_image:
        return list(beam_args)
    return [*beam_args, f"--sdk_container_image={image}"]


def check_compilable(tfx_pipeline, source: str) -> None:
    """Every resolver node of the DAG is one KubeflowV2DagRunner compiles (its step builder knows
    LatestBlessedModelStrategy and LatestArtifactStrategy only, step_builder.py:847-869)."""
    from tfx.dsl.components.common import resolver
    from tfx.dsl.input_resolution.strategies import latest_artifact_strategy, latest_blessed_model_strategy

    compiled = (latest_blessed_model_strategy.LatestBlessedModelStrategy,
                latest_artifact_strategy.LatestArtifactStrategy)
    for node in tfx_pipeline.components:
        strategy = node.exec_properties.get(resolver.RESOLVER_STRATEGY_CLASS) if isinstance(
            node, resolver.Resolver) else None
        if strategy is not None and strategy not in compiled:
            raise KubeflowError(f"{source}: resolver '{node.id}' ({strategy.__name__}) cannot be compiled for "
                                f"Kubeflow: KubeflowV2DagRunner compiles only "
                                f"{' and '.join(c.__name__ for c in compiled)}; leave the node out for Kubeflow "
                                f"(as baseline: none and Environment.span_to_span_drift do) or run it locally")


# --- compile --------------------------------------------------------------------------------

def default_output(spec_name: str) -> str:
    return os.path.join(BUILD_DIR, f"{spec_name}_pipeline.yaml")


def compile_pipeline(spec_path: str = "configs/taxi.yaml", env_path: str = DEFAULT_ENV, image: Optional[str] = None,
                     beam_profile: Optional[str] = None, output: Optional[str] = None) -> Dict:
    """Compiles create_pipeline(spec, env) to a PipelineSpec YAML; returns a summary of what it wrote."""
    spec = feature_spec.load(spec_path)
    refuse_rolling_window(spec)
    env = load_environment(env_path, spec)
    image = image or env.get("image")
    if not image:
        raise KubeflowError(f"{env['source']}: image: is required (the training image built from Dockerfile.train), "
                            f"or pass --image")
    baseline = env.get("baseline", "none")
    if baseline in ("excluding_candidate", "stable"):
        raise KubeflowError(f"{env['source']}: baseline: {baseline} is a custom resolver strategy of "
                            f"components/baseline.py, which KubeflowV2DagRunner cannot compile; use none "
                            f"(open-source Kubeflow Pipelines) or latest_blessed (Vertex AI)")
    beam_args = beam_profiles.beam_args(env, env["source"], beam_profile, pipeline_root=env["pipeline_root"],
                                        name=spec.name, image=image)
    pod_spec = spec_for_image(spec, env["data_path"], env["source"])

    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2
    from tfx.orchestration.kubeflow.v2 import kubeflow_v2_dag_runner

    from pipelines import pipeline as pipeline_lib

    beam_profiles.check_flags(beam_args, env["source"])
    beam_args = in_pod_workers_hold_the_code(beam_args, image)
    environment = pipeline_lib.Environment(
        pipeline_root=env["pipeline_root"], model_repository=env["model_repository"], beam_pipeline_args=beam_args,
        enable_cache=env.get("enable_cache", True), sandbox=dict(env.get("sandbox") or {}), baseline=baseline,
        span_to_span_drift=False)
    from tfx.orchestration import data_types

    data_root, _ = pipeline_lib.data_folder(pod_spec)
    try:
        tfx_pipeline = pipeline_lib.create_pipeline(
            pod_spec, environment, pipeline_name=kfp_pipeline_name(spec.name),
            data_root=data_types.RuntimeParameter(name=DATA_ROOT_PARAMETER, ptype=str, default=data_root))
    except ValueError as e:  # a bad baseline or sandbox key: name the file
        raise KubeflowError(f"{env['source']}: {e}") from e
    check_compilable(tfx_pipeline, env["source"])
    example_gen = next(c.id for c in tfx_pipeline.components if c.id.endswith("ExampleGen"))
    config = kubeflow_v2_dag_runner.KubeflowV2DagRunnerConfig(
        default_image=image, default_commands=list(ENTRYPOINT), use_pipeline_spec_2_1=True)
    job = kubeflow_v2_dag_runner.KubeflowV2DagRunner(config).run(tfx_pipeline, write_out=False)
    pipeline_spec = _standalone(job["pipelineSpec"], env["pipeline_root"], data_root, example_gen)
    json_format.ParseDict(pipeline_spec, pipeline_spec_pb2.PipelineSpec())  # what KFP will parse it into

    output = output or default_output(spec.name)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    header = [f"# KFP v2 pipeline spec compiled by pipelines/kubeflow_runner.py from {os.path.relpath(spec.source)} "
              f"and {os.path.relpath(env['source'])}",
              f"# image: {image}", f"# beam: {' '.join(beam_args)}", f"# baseline: {baseline}"]
    local_only = list(LOCAL_ONLY_WITH_SPANS) if spec.has_spans else []
    header += [f"# local only: {what}" for what in local_only]
    with open(output, "w") as f:
        f.write("\n".join(header) + "\n")
        yaml.safe_dump(pipeline_spec, f, sort_keys=True)
    tasks = pipeline_spec["root"]["dag"]["tasks"]
    return {"output": output, "pipeline_name": pipeline_spec["pipelineInfo"]["name"], "image": image,
            "tasks": sorted(tasks), "parameters": sorted(pipeline_spec["root"].get("inputDefinitions", {})
                                                         .get("parameters", {})),
            "pipeline_root": env["pipeline_root"], "beam_args": beam_args, "bytes": os.path.getsize(output),
            "local_only": local_only}


def _standalone(pipeline_spec: Dict, pipeline_root: str, data_root: str, example_gen: str) -> Dict:
    """What TFX 1.16's KubeflowV2 compiler has no option for, so that a spec uploaded on its own
    runs (the DAG itself is create_pipeline's, untouched):
      * defaultPipelineRoot: the compiler puts the root in the job's runtime config only
        (kubeflow_v2_dag_runner.py:306-329), which an uploaded spec lacks;
      * the data_root parameter's default: it attaches RuntimeParameters with their type only
        (pipeline_builder.py:287-290), so every run would have to name the data;
      * no caching for ExampleGen: caching is one pipeline-wide switch (pipeline_builder.py:237,
        step_builder.py:430-433), and KFP would reuse old examples for a folder that got new CSVs;
      * in its place, ExampleGen's two entrypoint parameters (pipelines/kubeflow_entrypoint.py): the
        record of what it last ingested, under the pipeline root, and the pipeline parameter
        require_new_span (false; the recurring run `schedule` creates sets it), which stops a run
        whose newest data is what was ingested last."""
    pipeline_spec["defaultPipelineRoot"] = pipeline_root
    root_parameters = pipeline_spec["root"]["inputDefinitions"]["parameters"]
    root_parameters[DATA_ROOT_PARAMETER].update(defaultValue=data_root,
                                                description="folder or bucket prefix CsvExampleGen reads")
    root_parameters[kubeflow_entrypoint.REQUIRE_NEW_PARAMETER] = {
        "parameterType": "BOOLEAN", "defaultValue": False, "isOptional": True,
        "description": "stop at CsvExampleGen when the newest span is the one it ingested last (recurring runs)"}
    task = pipeline_spec["root"]["dag"]["tasks"][example_gen]
    task["cachingOptions"] = {}
    record, require_new = kubeflow_entrypoint.RECORD_PARAMETER, kubeflow_entrypoint.REQUIRE_NEW_PARAMETER
    task["inputs"]["parameters"].update({
        record: {"runtimeValue": {"constant": kubeflow_entrypoint.record_path(pipeline_root, example_gen)}},
        require_new: {"componentInputParameter": require_new}})
    pipeline_spec["components"][task["componentRef"]["name"]]["inputDefinitions"]["parameters"].update({
        record: {"parameterType": "STRING"}, require_new: {"parameterType": "BOOLEAN"}})
    return pipeline_spec


# --- submit and schedule --------------------------------------------------------------------

def read_package(path: str) -> Dict:
    """(name, default pipeline root) of a compiled spec, for the run it is uploaded for."""
    try:
        with open(path) as f:
            spec = yaml.safe_load(f)
    except OSError as e:
        raise KubeflowError(f"cannot read pipeline package '{path}': {e.strerror}") from e
    if not isinstance(spec, dict) or "pipelineInfo" not in spec:
        raise KubeflowError(f"{path}: not a compiled pipeline spec (no pipelineInfo)")
    return {"name": spec["pipelineInfo"]["name"], "pipeline_root": spec.get("defaultPipelineRoot")}


def kfp_cron(cron: str) -> str:
    """A cron expression as KFP's scheduler reads it: six fields, seconds first (or an @descriptor).

    A five-field crontab line gets "0" seconds in front: "0 3 * * *" -> "0 0 3 * * *".
    """
    fields = cron.split()
    if len(fields) == 1 and fields[0].startswith("@"):
        return fields[0]
    if len(fields) == 5:
        fields = ["0"] + fields
    if len(fields) != 6:
        raise KubeflowError(f"--cron '{cron}': KFP schedules take six fields (seconds minutes hours day-of-month "
                            f"month day-of-week, e.g. '0 0 3 * * *') or five crontab fields")
    return " ".join(fields)


def _code_version() -> str:
    """The uploaded pipeline version's name: the UTC time and the code's commit (fingerprint.code_commit,
    the one rule the local runner tags its runs with; shortened, "+uncommitted" kept)."""
    commit = fingerprint.code_commit() or ""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H-%M-%SZ")
    short = commit[:12] + ("+uncommitted" if commit.endswith("+uncommitted") else "")
    return f"{stamp}-{short}" if commit else stamp


def client(host: str, namespace: Optional[str] = None):
    import kfp

    return kfp.Client(host=host, namespace=namespace or "kubeflow")


def upload(kfp_client, package: str, pipeline_name: str, version_name: str) -> Tuple[str, str]:
    """Uploads the package as a new version of the pipeline (created on first upload): (pipeline, version) ids."""
    pipeline_id = kfp_client.get_pipeline_id(pipeline_name)
    if pipeline_id is None:
        pipeline_id = kfp_client.upload_pipeline(package, pipeline_name=pipeline_name,
                                                  description="skewless: compiled by pipelines/kubeflow_runner.py"
                                                  ).pipeline_id
        versions = kfp_client.list_pipeline_versions(pipeline_id, page_size=1, sort_by="created_at desc")
        return pipeline_id, versions.pipeline_versions[0].pipeline_version_id
    version = kfp_client.upload_pipeline_version(package, pipeline_version_name=version_name, pipeline_id=pipeline_id)
    return pipeline_id, version.pipeline_version_id


def _prepare(package: Optional[str], compile_args: Dict) -> Tuple[str, Dict]:
    if package is None:
        package = compile_pipeline(**compile_args)["output"]
    return package, read_package(package)


def submit(host: str, experiment: str = "skewless", package: Optional[str] = None, run_name: Optional[str] = None,
           namespace: Optional[str] = None, **compile_args) -> Dict:
    """Uploads the compiled pipeline and starts one run on it; returns ids and the run's link."""
    package, info = _prepare(package, compile_args)
    kfp_client = client(host, namespace)
    version = _code_version()
    pipeline_id, version_id = upload(kfp_client, package, info["name"], version)
    experiment_id = kfp_client.create_experiment(experiment, namespace=namespace).experiment_id
    run = kfp_client.run_pipeline(experiment_id=experiment_id, job_name=run_name or f"{info['name']} {version}",
                                  pipeline_id=pipeline_id, version_id=version_id, pipeline_root=info["pipeline_root"])
    return {"run_id": run.run_id, "pipeline_id": pipeline_id, "version_id": version_id,
            "experiment_id": experiment_id, "link": f"{kfp_client._get_url_prefix()}/#/runs/details/{run.run_id}"}


def schedule(host: str, cron: str, experiment: str = "skewless", package: Optional[str] = None,
             job_name: Optional[str] = None, namespace: Optional[str] = None, **compile_args) -> Dict:
    """Uploads the compiled pipeline and creates a recurring run on it: continuous retraining.

    One run at a time (max_concurrency 1) and no catch-up: after a pause the scheduler starts the
    latest missed run only, since each run retrains on all the data there is. Each run requires new
    data (require_new_span): a tick that finds the span ingested last stops at ExampleGen.
    """
    cron = kfp_cron(cron)
    package, info = _prepare(package, compile_args)
    kfp_client = client(host, namespace)
    pipeline_id, version_id = upload(kfp_client, package, info["name"], _code_version())
    experiment_id = kfp_client.create_experiment(experiment, namespace=namespace).experiment_id
    recurring = kfp_client.create_recurring_run(
        experiment_id=experiment_id, job_name=job_name or f"{info['name']} retraining", cron_expression=cron,
        pipeline_id=pipeline_id, version_id=version_id, max_concurrency=1, no_catchup=True,
        pipeline_root=info["pipeline_root"], params={kubeflow_entrypoint.REQUIRE_NEW_PARAMETER: True})
    return {"recurring_run_id": recurring.recurring_run_id, "cron": cron, "pipeline_id": pipeline_id,
            "version_id": version_id, "experiment_id": experiment_id,
            "link": f"{kfp_client._get_url_prefix()}/#/recurringrun/details/{recurring.recurring_run_id}"}


# --- command line ---------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    compile_options = argparse.ArgumentParser(add_help=False)
    compile_options.add_argument("--spec", default="configs/taxi.yaml")
    compile_options.add_argument("--env", default=DEFAULT_ENV)
    compile_options.add_argument("--image", help="the training image (Dockerfile.train) in place of the env "
                                                 "file's image:")
    compile_options.add_argument("--beam_profile", help="a configs/beam/ profile in place of the env file's "
                                                        f"(one of {', '.join(beam_profiles.profile_names())})")
    compile_options.add_argument("--output", help="the YAML to write (default build/kubeflow/<name>_pipeline.yaml)")
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--host", default=os.environ.get("KF_PIPELINES_ENDPOINT"),
                        help="the KFP API endpoint, e.g. http://localhost:8080 (default $KF_PIPELINES_ENDPOINT)")
    remote.add_argument("--experiment", default="skewless")
    remote.add_argument("--namespace", help="the Kubeflow profile namespace of a multi-user deployment")
    remote.add_argument("--package", help="a compiled spec to upload as it is (default: compile first)")
    commands.add_parser("compile", parents=[compile_options], help="write the KFP v2 pipeline spec (YAML)")
    run = commands.add_parser("submit", parents=[compile_options, remote], help="upload and start one run")
    run.add_argument("--run_name")
    recurring = commands.add_parser("schedule", parents=[compile_options, remote],
                                    help="upload and create a recurring run")
    recurring.add_argument("--cron", required=True, help="six fields, seconds first ('0 0 3 * * *'), or crontab's five")
    recurring.add_argument("--job_name")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    compile_args = dict(spec_path=args.spec, env_path=args.env, image=args.image, beam_profile=args.beam_profile,
                        output=args.output)
    try:
        if args.command == "compile":
            summary = compile_pipeline(**compile_args)
            print(f"wrote {os.path.relpath(summary['output'])} ({summary['bytes']:,} bytes): pipeline "
                  f"'{summary['pipeline_name']}', {len(summary['tasks'])} tasks, image {summary['image']}, "
                  f"runtime parameters {', '.join(summary['parameters']) or 'none'}, root {summary['pipeline_root']}")
            for what in summary["local_only"]:
                print(f"local only, not in the compiled pipeline: {what}")
            return 0
        if not args.host:
            raise KubeflowError("--host: the KFP API endpoint is required (or set KF_PIPELINES_ENDPOINT)")
        if args.command == "submit":
            result = submit(args.host, args.experiment, args.package, args.run_name, args.namespace, **compile_args)
            print(f"run {result['run_id']} submitted: {result['link']}")
        else:
            result = schedule(args.host, args.cron, args.experiment, args.package, args.job_name, args.namespace,
                              **compile_args)
            print(f"recurring run {result['recurring_run_id']} ({result['cron']}): {result['link']}")
        return 0
    except feature_spec.SpecError as e:  # KubeflowError and ProfileError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the KFP API's answer, a network error
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
