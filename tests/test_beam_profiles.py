"""Beam profiles (configs/beam/): each parses into Beam's PipelineOptions for its runner, and the
local runner runs the whole pipeline under the multi-processing profile (slow)."""

import os
import re
import sqlite3

import pytest
import yaml

from tests.conftest import REPO, TAXI_SPEC, read_rows, taxi_csv_path, write_sample

PROFILE_DIR = os.path.join(REPO, "configs", "beam")
EXPECTED_RUNNERS = {"direct_in_memory": "DirectRunner", "direct_multi_processing": "DirectRunner",
                    "dataflow": "DataflowRunner", "flink": "FlinkRunner", "spark": "SparkRunner"}
# Values an environment file would give the profiles' required placeholders.
ENV_VARS = {"project": "demo-project", "region": "europe-west4", "flink_master": "flink-jobmanager:8081",
            "spark_master": "spark://spark-master:7077", "spark_rest": "http://spark-master:6066"}
KNOWN = {"pipeline_root": "gs://bucket/pipelines/taxi", "name": "taxi", "image": "skewless-train:test"}


def _options(args):
    from apache_beam.options.pipeline_options import PipelineOptions

    return PipelineOptions(args)


def test_the_profiles_are_the_ones_expected():
    assert sorted(f[:-5] for f in os.listdir(PROFILE_DIR) if f.endswith(".yaml")) == sorted(EXPECTED_RUNNERS)


@pytest.mark.parametrize("name", sorted(EXPECTED_RUNNERS))
def test_every_profile_parses_into_beam_options_for_its_runner_with_no_unknown_flag(name):
    from apache_beam.options.pipeline_options import StandardOptions
    from apache_beam.runners.runner import create_runner

    from pipelines import beam_profiles

    args = beam_profiles.beam_args({"beam_profile": name, "beam_vars": ENV_VARS}, "env.yaml", **KNOWN)
    assert not [a for a in args if "{" in a or "}" in a]  # every placeholder filled
    options = _options(args)
    assert options.view_as(StandardOptions).runner == EXPECTED_RUNNERS[name]
    assert type(create_runner(EXPECTED_RUNNERS[name])).__name__.endswith(EXPECTED_RUNNERS[name])
    assert beam_profiles.unknown_flags(args) == []
    beam_profiles.check_flags(args, "env.yaml")  # values Beam's parser accepts too


def test_direct_profiles_choose_the_running_mode():
    from apache_beam.options.pipeline_options import DirectOptions

    from pipelines import beam_profiles

    modes = {name: _options(beam_profiles.beam_args({"beam_profile": name}, "env.yaml", **KNOWN))
             .view_as(DirectOptions) for name in ("direct_in_memory", "direct_multi_processing")}
    assert (modes["direct_in_memory"].direct_running_mode, modes["direct_in_memory"].direct_num_workers) == (
        "in_memory", 1)
    assert (modes["direct_multi_processing"].direct_running_mode,
            modes["direct_multi_processing"].direct_num_workers) == ("multi_processing", 0)  # 0: one per CPU


def test_remote_profiles_run_the_training_image_and_keep_temp_files_under_the_pipeline_root():
    from apache_beam.options.pipeline_options import GoogleCloudOptions, PortableOptions, WorkerOptions
    from tfx.utils import dependency_utils

    from pipelines import beam_profiles

    def options(name):
        return _options(beam_profiles.beam_args({"beam_profile": name, "beam_vars": ENV_VARS}, "env.yaml", **KNOWN))

    dataflow = options("dataflow")
    assert dataflow.view_as(WorkerOptions).sdk_container_image == KNOWN["image"]
    google = dataflow.view_as(GoogleCloudOptions)
    assert (google.project, google.region) == (ENV_VARS["project"], ENV_VARS["region"])
    assert google.temp_location.startswith(KNOWN["pipeline_root"] + "/")
    for name in ("flink", "spark"):
        portable = options(name).view_as(PortableOptions)
        # Workers in an external pool (the training image started with Beam's boot --worker_pool),
        # not Beam's stock SDK image, which has neither TFX nor our code.
        assert portable.environment_type == "EXTERNAL" and portable.environment_config
    for name in ("dataflow", "flink", "spark"):
        args = beam_profiles.beam_args({"beam_profile": name, "beam_vars": ENV_VARS}, "env.yaml", **KNOWN)
        # With an SDK image named, TFX stages no sdist of itself for the workers to pip-install.
        assert dependency_utils.make_beam_dependency_flags(args) == args


def test_placeholders_fill_from_profile_then_environment_then_runner_and_beam_args_come_last(tmp_path):
    from pipelines import beam_profiles

    env = {"beam_profile": "direct_multi_processing", "beam_vars": {"workers": 3},
           "beam_args": ["--direct_num_workers=5", "--direct_runner_bundle_repeat=2"]}
    args = beam_profiles.beam_args(env, "env.yaml", **KNOWN)
    assert args[0] == "--runner=DirectRunner"
    assert args.index("--direct_num_workers=3") < args.index("--direct_num_workers=5")
    assert _options(args).get_all_options()["direct_num_workers"] == 5  # the environment file's word wins
    assert beam_profiles.beam_args({"beam_args": ["--direct_num_workers=2"]}, "env.yaml") == ["--direct_num_workers=2"]
    # A runner's --beam_profile replaces the file's.
    assert beam_profiles.beam_args(env, "env.yaml", "direct_in_memory", **KNOWN)[:3] == [
        "--runner=DirectRunner", "--direct_running_mode=in_memory", "--direct_num_workers=1"]


@pytest.mark.parametrize("profile, message", [
    ({"runner": "DirectRunner", "args": ["--project={project}"], "vars": {"project": None}},
     r"p.yaml: --project=\{project\}: no value for 'project'; set beam_vars.project in env.yaml"),
    ({"args": ["--direct_num_workers=1"]}, r"p.yaml: runner: is required"),
    ({"runner": "DirectRunner", "args": ["--runner=FlinkRunner"]},
     r"p.yaml: args: --runner belongs in the runner: key"),
    ({"runner": "DirectRunner", "arguments": []}, r"p.yaml: arguments: unknown key \(allowed: args, runner, vars\) "
                                                   r"\(.*p.yaml:1\)"),  # safe_dump sorts: line 1
    ({"runner": "DirectRunner", "args": "--direct_num_workers=1"}, r"p.yaml: args: must be list, got str"),
    ({"runner": "DirectRunner", "args": ["direct_num_workers=1"]},
     r"p.yaml: args\[0\]: must be a --flag\[=value\] string, got 'direct_num_workers=1'"),
])
def test_profile_mistakes_name_the_file_and_key(tmp_path, profile, message):
    from pipelines import beam_profiles

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(profile))
    with pytest.raises(beam_profiles.ProfileError, match=message):
        beam_profiles.beam_args({"beam_profile": str(path)}, "env.yaml", **KNOWN)


def test_a_missing_profile_lists_the_available_ones():
    from pipelines import beam_profiles

    with pytest.raises(beam_profiles.ProfileError, match=r"beam profile 'flinq': no file .*flinq.yaml .*flink"):
        beam_profiles.beam_args({"beam_profile": "flinq"}, "env.yaml")


@pytest.mark.parametrize("args, message", [
    (["--runner=DirectRunner", "--direct_num_wokers=2"], r"env.yaml: Beam does not know --direct_num_wokers"),
    (["--direct_running_mode=multi_process"], r"env.yaml: Beam refuses the arguments: .*direct_running_mode"),
])
def test_flags_beam_would_drop_or_refuse_are_errors(args, message):
    from pipelines import beam_profiles

    with pytest.raises(beam_profiles.ProfileError, match=message):
        beam_profiles.check_flags(args, "env.yaml")


def test_local_runner_refuses_an_unknown_profile_before_running(capsys):
    from pipelines import local_runner

    assert local_runner.main(["--beam_profile", "no_such_profile"]) == 2
    err = capsys.readouterr().err
    assert "no_such_profile" in err and "direct_multi_processing" in err


# --- the whole pipeline under the multi-processing profile (slow) ----------------------------

@pytest.mark.slow
def test_local_pipeline_runs_under_the_multi_processing_profile(tmp_path):
    """LocalDagRunner on 1,200 taxi rows with `--beam_profile direct_multi_processing`.

    What is asserted (every component ran, Beam SDK workers did the work) does not depend on
    the model's quality: few rows, one epoch, no slices and no thresholds keep the run short."""
    from components import feature_spec
    from pipelines import local_runner

    with open(TAXI_SPEC) as f:
        raw = yaml.safe_load(f)
    raw["schema"] = os.path.join(REPO, raw["schema"])
    raw["training"]["schedule"] = [{"learning_rate": 0.003, "batch_size": 128, "epochs": 1}]
    raw["slices"], raw["thresholds"] = [], {}
    spec_path = tmp_path / "taxi_sample.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    env_path = tmp_path / "env.yaml"
    env_path.write_text(yaml.safe_dump({
        "pipeline_root": f"{tmp_path}/pipelines/{{name}}", "metadata_path": f"{tmp_path}/metadata/{{name}}.sqlite",
        "model_repository": f"{tmp_path}/models", "beam_profile": "direct_in_memory",
        "sandbox": {"rows": 100, "latency_requests": 50, "throughput_seconds": 1, "max_p50_ms": 500,
                    "max_p99_ms": 5000, "min_requests_per_second": 1, "warmup_records": 10}}))
    data = tmp_path / "data"
    write_sample(read_rows(taxi_csv_path(feature_spec.load(TAXI_SPEC)), limit=1200), str(data))

    summary = local_runner.run(str(spec_path), str(env_path), data_path=str(data), quiet=True,
                               summary_path=str(tmp_path / "run_summary.json"), report_dir=str(tmp_path / "reports"),
                               beam_profile="direct_multi_processing")
    assert summary["succeeded"], summary.get("error")
    # Every component ran (nothing came from a cache), Transform and the Evaluator under Beam.
    with sqlite3.connect(tmp_path / "metadata" / "taxi.sqlite") as db:
        states = dict(db.execute(
            "SELECT c.name, e.last_known_state FROM Execution e JOIN Association a ON a.execution_id = e.id "
            "JOIN Context c ON c.id = a.context_id JOIN Type t ON t.id = c.type_id WHERE t.name = 'node'"))
    ran = {name.split(".", 1)[1] for name, state in states.items() if state == 3}  # COMPLETE
    assert {"CsvExampleGen", "StatisticsGen", "Transform", "Trainer", "Evaluator"} <= ran
    # The profile's arguments replaced the environment file's, and Beam ran SDK worker processes:
    # their log lines come back through the local job service, which in-memory runs do not start.
    with open(summary["log"]) as f:
        log = f.read()
    # (Which INFO lines of TFX reach the file depends on logging set up earlier in the process;
    # the workers' own lines always come back, and they print their options.)
    assert re.search(r"local_job_service: Worker: .*direct_running_mode\\?': \\?'multi_processing", log)
    assert "=in_memory" not in log and "'in_memory'" not in log
    assert summary["metrics"]["overall"]["example_count"] > 200  # the eval split, about a third


def test_tfx_gets_no_arguments_where_they_only_say_what_beam_does_by_default(monkeypatch):
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions
    from tfx.components.statistics_gen.executor import Executor  # one of TFX's Beam executors
    from tfx.dsl.components.base import base_beam_executor
    from tfx.utils import dependency_utils

    from pipelines import beam_profiles

    in_memory = beam_profiles.beam_args({"beam_profile": "direct_in_memory"}, "env.yaml", **KNOWN)
    assert beam_profiles.for_tfx(in_memory) == []
    # Beam with no arguments runs what the profile names (apache_beam/pipeline.py line 196 takes
    # StandardOptions.DEFAULT_RUNNER for no --runner; DirectOptions' defaults are in_memory and 1 worker).
    assert StandardOptions.DEFAULT_RUNNER == "DirectRunner" and _options([]).view_as(StandardOptions).runner is None
    direct = _options([]).view_as(DirectOptions)
    assert (direct.direct_running_mode, direct.direct_num_workers) == ("in_memory", 1)
    # Anything else is passed as it is: another mode, another worker count, any further flag.
    for args in (beam_profiles.beam_args({"beam_profile": "direct_multi_processing"}, "env.yaml", **KNOWN),
                 in_memory[:-1] + ["--direct_num_workers=2"], in_memory + ["--experiments=beam_fn_api"]):
        assert beam_profiles.for_tfx(args) == args
    # Why: TFX builds a source package of itself for remote workers whenever it gets arguments
    # (tfx/dsl/components/base/base_beam_executor.py lines 82-84), and only then.
    built = []
    monkeypatch.setattr(dependency_utils, "make_beam_dependency_flags", lambda args: built.append(args) or args)
    context = base_beam_executor.BaseBeamExecutor.Context
    Executor(context(beam_pipeline_args=beam_profiles.for_tfx(in_memory)))
    assert built == []
    Executor(context(beam_pipeline_args=in_memory))
    assert built == [in_memory]
