"""Distributed training: the same trainer code in every process of a loopback cluster.

Each cluster test starts real processes with TF_CONFIG on 127.0.0.1 (free ports) over the
small transform (1,500 taxi rows, one TFRecord file per split) and compares the result with
single-device training of the same spec, run in this process.

Tolerances. The synchronous strategies (mirrored, multi_worker) see exactly the single-device
computation: the same initial weights (seeded), the same shuffled order, the same global batch
per step (split into one share per replica, gradients all-reduced). Only the order of
floating-point additions differs, which moves weights by ~1e-7 per step; measured here, the
metrics came out equal to every printed digit. The bounds (0.005 on loss and AUC, 0.01 = three
of 300 eval rows on accuracy) leave room for that rounding and nothing else: a worker that
trained on the wrong share of the data, or twice on the same share, misses them by far.
Parameter-server training is asynchronous (workers apply gradients computed on stale weights,
each from its own shuffle), so its result varies from run to run: over five runs here it stayed
within 0.010 AUC, 0.025 loss and 0.013 accuracy of single-device training. Its bounds (0.03,
0.05, 0.03) are two to three times that spread: wide enough not to flake, narrow enough to catch
workers that train on nothing or on a fraction of the steps.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import yaml

from components import feature_spec, strategy as strategy_lib
from tests.conftest import REPO, TAXI_SPEC

TRAINING = {
    "deterministic": True,
    "seed": 7,
    # Two stages: the second rebuilds the input at another batch size on the same weights.
    "schedule": [{"learning_rate": 0.005, "batch_size": 64, "epochs": 3},
                 {"learning_rate": 0.001, "batch_size": 256, "epochs": 1}],
    "strategy": {"type": "default"},
}
SYNC_TOLERANCE = {"loss": 0.005, "auc": 0.005, "accuracy": 0.01}
# Asynchronous parameter-server updates apply stale gradients in an order no seed fixes, so the
# model differs from the single-device one. The accuracy bound is three binomial standard errors
# of an accuracy near 0.9 on the 300 eval rows, 3 * sqrt(0.9 * 0.1 / 300) = 0.052: 0.03 (9 rows)
# failed once on a correct run (260 vs 270 rows right). A broken run still fails it: the majority
# class alone scores about 0.78 on taxi rows.
ASYNC_TOLERANCE = {"loss": 0.05, "auc": 0.03, "accuracy": 0.052}
EXPORT_ENTRIES = {"saved_model.pb", "variables", "assets", "assets.extra", "fingerprint.pb", "keras_metadata.pb"}
SIGNATURES = {"serving_default", "serving_tf_example", "transform_features", "classification"}
CLUSTER_TIMEOUT_S = 300


def _write_spec(path, **training):
    with open(TAXI_SPEC) as f:
        raw = yaml.safe_load(f)
    raw["training"] = {**raw["training"], **TRAINING, **training}
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return str(path)


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory):
    return _write_spec(tmp_path_factory.mktemp("distributed_spec") / "taxi.yaml")


@pytest.fixture(scope="module")
def single_device(spec_path, small_transform, tmp_path_factory):
    """Metrics of the same spec trained without distribution, in this process."""
    from components.trainer import train_and_export

    graph_dir, train_files, eval_files = small_transform
    model_dir = str(tmp_path_factory.mktemp("single_device") / "model")
    return train_and_export(feature_spec.load(spec_path), graph_dir, [train_files], [eval_files], model_dir)


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _cluster(**counts):
    ports = iter(_free_ports(sum(counts.values())))
    return {task: [f"127.0.0.1:{next(ports)}" for _ in range(n)] for task, n in counts.items()}


class _Cluster:
    """Processes of one loopback cluster, each with its TF_CONFIG, log file and TMPDIR."""

    def __init__(self, cluster, command, workdir):
        self.cluster, self.workdir, self.procs, self.logs, self.tmpdirs = cluster, workdir, {}, {}, {}
        try:
            for task, addresses in cluster.items():
                for index in range(len(addresses)):
                    self._start(f"{task}{index}", command, {"cluster": cluster, "task": {"type": task, "index": index}})
        except BaseException:
            self.stop()
            raise

    def _start(self, name, command, tf_config):
        self.tmpdirs[name] = os.path.join(self.workdir, f"tmp_{name}")
        os.makedirs(self.tmpdirs[name])
        env = dict(os.environ, PYTHONPATH=REPO, TMPDIR=self.tmpdirs[name], TF_USE_LEGACY_KERAS="1",
                   TF_CONFIG=json.dumps(tf_config))
        self.logs[name] = os.path.join(self.workdir, f"{name}.log")
        with open(self.logs[name], "w") as log:
            self.procs[name] = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def wait(self, names, timeout=CLUSTER_TIMEOUT_S):
        deadline = time.monotonic() + timeout
        codes = {}
        for name in names:
            try:
                codes[name] = self.procs[name].wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                codes[name] = "timeout"
        return codes

    def log(self, name):
        with open(self.logs[name]) as f:
            return f.read()

    def failure(self, codes):
        return "\n".join(f"--- {name} exited {code}:\n{self.log(name)[-3000:]}" for name, code in codes.items()
                         if code != 0)

    def stop(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _trainer_cli(spec_path, small_transform, out_dir, strategy):
    graph_dir, train_files, eval_files = small_transform
    return [sys.executable, "-m", "components.trainer", "--spec", spec_path, "--strategy", json.dumps(strategy),
            "--transform_graph", graph_dir, "--train_files", train_files, "--eval_files", eval_files,
            "--serving_model_dir", os.path.join(out_dir, "model"),
            "--metrics_file", os.path.join(out_dir, "metrics.json")]


def _assert_close(metrics, reference, tolerance):
    assert set(metrics) == set(reference)
    for name, bound in tolerance.items():
        assert abs(metrics[name] - reference[name]) <= bound, (name, metrics, reference)


def _assert_exported(model_dir):
    import tensorflow as tf

    assert set(os.listdir(model_dir)) == EXPORT_ENTRIES, os.listdir(model_dir)
    assert os.path.exists(os.path.join(model_dir, "assets.extra", "serving_spec.json"))
    loaded = tf.saved_model.load(model_dir)
    assert set(loaded.signatures) == SIGNATURES
    # Every feature but the required payment_type missing: the Transform graph inside the model
    # fills them and the model answers.
    only_payment = tf.train.Example(features=tf.train.Features(feature={
        "payment_type": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"Cash"]))})).SerializeToString()
    scores = loaded.signatures["serving_tf_example"](examples=tf.constant([only_payment] * 2))["score"].numpy()
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 1)).all()


def _leftovers(tmpdir):
    return [name for name in os.listdir(tmpdir) if name.startswith("skewless-")]


# --- loopback clusters ------------------------------------------------------------------


def test_multi_worker_run_fn_matches_single_worker(spec_path, small_transform, single_device, tmp_path):
    """Two workers run the pipeline Trainer's run_fn; worker 0 (no chief task) exports."""
    graph_dir, train_files, eval_files = small_transform
    spec = feature_spec.load(spec_path)
    custom_config = spec.to_custom_config()
    custom_config["feature_spec"]["training"]["strategy"] = {"type": "multi_worker"}
    fn_args = dict(custom_config=custom_config, transform_output=graph_dir, train_files=[train_files],
                   eval_files=[eval_files], serving_model_dir=str(tmp_path / "serving_model_dir"),
                   model_run_dir=str(tmp_path / "model_run_dir"))
    script = ("import json, logging, sys\n"
              "logging.basicConfig(level=logging.INFO)  # as TFX's executor logs\n"
              "from tfx.components.trainer.fn_args_utils import FnArgs\n"
              "from components.trainer import run_fn\n"
              "run_fn(FnArgs(**json.loads(sys.argv[1])))\n")
    cluster = _Cluster(_cluster(worker=2), [sys.executable, "-c", script, json.dumps(fn_args)], str(tmp_path))
    try:
        codes = cluster.wait(["worker0", "worker1"])
    finally:
        cluster.stop()
    assert codes == {"worker0": 0, "worker1": 0}, cluster.failure(codes)

    for name in ("worker0", "worker1"):
        assert "'replicas': 2" in cluster.log(name)  # one synchronous step across both processes
    _assert_exported(fn_args["serving_model_dir"])
    # The run's files are the chief's; worker 1 saved too (it must), into its TMPDIR, then removed that.
    assert os.listdir(fn_args["model_run_dir"]) == ["training_metrics.json"]
    with open(os.path.join(fn_args["model_run_dir"], "training_metrics.json")) as f:
        _assert_close(json.load(f), single_device, SYNC_TOLERANCE)
    saved = [line for line in cluster.log("worker1").splitlines() if "non-chief worker:1: saved to" in line]
    assert saved and cluster.tmpdirs["worker1"] in saved[0], cluster.log("worker1")[-2000:]
    assert "non-chief" not in cluster.log("worker0")
    assert _leftovers(cluster.tmpdirs["worker1"]) == [] and _leftovers(cluster.tmpdirs["worker0"]) == []


def test_mirrored_on_two_virtual_cpus_matches_single_device(spec_path, small_transform, single_device, tmp_path):
    """A fresh process, so the two virtual devices exist before TensorFlow starts."""
    command = _trainer_cli(spec_path, small_transform, str(tmp_path), {"type": "mirrored", "num_devices": 2})
    out = subprocess.run(command, env=dict(os.environ, PYTHONPATH=REPO, TF_USE_LEGACY_KERAS="1"), cwd=REPO,
                         capture_output=True, text=True, timeout=CLUSTER_TIMEOUT_S)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "'strategy': 'MirroredStrategy', 'replicas': 2" in out.stderr
    _assert_exported(str(tmp_path / "model"))
    with open(tmp_path / "metrics.json") as f:
        _assert_close(json.load(f), single_device, SYNC_TOLERANCE)


@pytest.mark.slow
def test_parameter_server_cluster_trains_and_exports(small_transform, single_device, tmp_path):
    """A coordinator (chief), two workers and one parameter server, all running the trainer's CLI."""
    spec_path = _write_spec(tmp_path / "taxi_async.yaml", deterministic=False)
    command = _trainer_cli(spec_path, small_transform, str(tmp_path), {"type": "parameter_server"})
    cluster = _Cluster(_cluster(chief=1, worker=2, ps=1), command, str(tmp_path))
    try:
        codes = cluster.wait(["chief0"])
        servers_alive = {name: cluster.procs[name].poll() is None for name in ("worker0", "worker1", "ps0")}
    finally:
        cluster.stop()
    assert codes == {"chief0": 0}, cluster.failure(codes) + "".join(
        f"\n--- {n}:\n{cluster.log(n)[-1500:]}" for n in ("worker0", "ps0"))
    # The workers and the ps only serve: they were still up, waiting for the platform to stop them.
    assert servers_alive == {"worker0": True, "worker1": True, "ps0": True}
    for name in ("worker0", "worker1", "ps0"):
        assert f"parameter_server: {name[:-1]}:{name[-1]} serving at" in cluster.log(name)
    assert "ParameterServerStrategy" in cluster.log("chief0")
    _assert_exported(str(tmp_path / "model"))
    with open(tmp_path / "metrics.json") as f:
        _assert_close(json.load(f), single_device, ASYNC_TOLERANCE)


# --- cluster roles, save location, validation (no cluster) ------------------------------


@pytest.mark.parametrize("tf_config,chief", [
    ({"cluster": {"chief": ["a:1"], "worker": ["b:1"]}, "task": {"type": "chief", "index": 0}}, True),
    ({"cluster": {"chief": ["a:1"], "worker": ["b:1"]}, "task": {"type": "worker", "index": 0}}, False),
    ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 0}}, True),
    ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}, False),
    ({"cluster": {"chief": ["a:1"], "worker": ["b:1"], "ps": ["c:1"]}, "task": {"type": "ps", "index": 0}}, False),
    (None, True),
])
def test_chief_is_the_chief_task_or_worker_0_without_one(tf_config, chief):
    role = strategy_lib.cluster_role({"TF_CONFIG": json.dumps(tf_config)} if tf_config else {})
    assert role.is_chief is chief


@pytest.mark.parametrize("text,fragment", [
    ("{not json", "TF_CONFIG is not valid JSON"),
    (json.dumps({"cluster": {"worker": ["a:1"]}}), "no task.type"),
    (json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}), "worker:1 is not in"),
    (json.dumps({"cluster": {"worker": "a:1"}, "task": {"type": "worker"}}), "must map task types"),
])
def test_bad_tf_config_is_named(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        strategy_lib.cluster_role({"TF_CONFIG": text})


@pytest.mark.parametrize("kind,cluster,fragment", [
    ("default", {"chief": ["a:1"], "worker": ["b:1"]}, "'default' trains in one process"),
    ("mirrored", {"worker": ["a:1", "b:1"]}, "'mirrored' trains in one process"),
    ("multi_worker", {"chief": ["a:1"], "worker": ["b:1"], "ps": ["c:1"]}, "use parameter_server"),
    ("parameter_server", {"chief": ["a:1"], "worker": ["b:1"]}, "missing: ps"),
    ("parameter_server", {}, "missing: chief, worker, ps"),
])
def test_strategy_refuses_a_cluster_it_cannot_use(kind, cluster, fragment):
    role = strategy_lib.ClusterRole(cluster, "chief" if "chief" in cluster else ("worker" if cluster else None))
    with pytest.raises(ValueError, match=fragment) as e:
        strategy_lib.make_strategy({"type": kind}, role)
    assert "training.strategy.type" in str(e.value)


def test_multi_worker_after_the_runtime_started_says_why(monkeypatch):
    """As under the local runner, where Transform ran TensorFlow in the same process first."""
    import tensorflow as tf

    tf.constant(1.0) + 1.0  # the runtime is up in this process
    cluster = _cluster(worker=2)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}}))
    with pytest.raises(RuntimeError, match="must be created before TensorFlow starts its runtime"):
        strategy_lib.make_strategy({"type": "multi_worker"})


def test_non_chief_saves_to_a_private_directory_that_is_removed(monkeypatch, tmp_path):
    import tensorflow as tf

    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:1"]},
                                                "task": {"type": "worker", "index": 1}}))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    export_dir = str(tmp_path / "export")
    with strategy_lib.save_location(tf.distribute.get_strategy(), export_dir) as target:
        assert target != export_dir and target.startswith(str(tmp_path))
        os.makedirs(target)
        open(os.path.join(target, "saved_model.pb"), "w").close()
    assert os.listdir(tmp_path) == []
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:1"]},
                                                "task": {"type": "worker", "index": 0}}))
    with strategy_lib.save_location(tf.distribute.get_strategy(), export_dir) as target:
        assert target == export_dir


def _raw_taxi():
    with open(TAXI_SPEC) as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("strategy,extra,key,fragment", [
    ({"type": "mirrored", "gpus": 2}, {}, "training.strategy.gpus", "unknown key for strategy 'mirrored'"),
    ({"type": "mirrored", "num_devices": 0}, {}, "training.strategy.num_devices", "must be at least 1"),
    ({"type": "multi_worker", "communication": "mpi"}, {}, "training.strategy.communication", "'mpi' is not one of"),
    ({"type": "parameter_server", "examples_per_epoch": "all"}, {}, "training.strategy.examples_per_epoch",
     "must be int"),
    ({"type": "parameter_server"}, {"deterministic": True}, "training.deterministic", "asynchronously"),
    ({"type": "tpu", "tpu": 3}, {}, "training.strategy.tpu", "must be str"),
    ({"type": "default", "num_devices": 2}, {}, "training.strategy.num_devices", "allowed: no options"),
    ({"type": "horovod"}, {}, "training.strategy.type", "'horovod' is not one of"),
])
def test_strategy_block_errors_name_the_key(strategy, extra, key, fragment):
    raw = _raw_taxi()
    raw["training"] = {**raw["training"], **extra, "strategy": strategy}
    with pytest.raises(feature_spec.SpecError) as e:
        feature_spec.parse(raw, source="taxi.yaml")
    assert f"taxi.yaml: {key}: " in str(e.value) and fragment in str(e.value)


def test_strategy_options_are_kept_for_the_trainer():
    raw = _raw_taxi()
    raw["training"]["strategy"] = {"type": "multi_worker", "communication": "ring"}
    assert feature_spec.parse(raw).training.strategy == {"type": "multi_worker", "communication": "ring"}


def test_cli_strategy_override_is_checked_like_the_spec():
    from components.trainer import spec_with_strategy

    spec = feature_spec.load(TAXI_SPEC)
    assert spec_with_strategy(spec, {"type": "parameter_server"}).training.strategy == {"type": "parameter_server"}
    with pytest.raises(feature_spec.SpecError, match=r"\(--strategy\): training.strategy.workers: unknown key"):
        spec_with_strategy(spec, {"type": "multi_worker", "workers": 2})


# --- the TFJob example ------------------------------------------------------------------


def test_tfjob_example_runs_the_trainer_cli_in_every_replica():
    from components.trainer import argument_parser, spec_with_strategy

    with open(os.path.join(REPO, "deploy", "tfjob.yaml")) as f:
        job = yaml.safe_load(f)
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "TFJob")
    replicas = job["spec"]["tfReplicaSpecs"]
    assert set(replicas) <= {"Chief", "Worker", "PS", "Evaluator"} and "Chief" in replicas
    containers = {}
    for kind, replica in replicas.items():
        assert isinstance(replica["replicas"], int) and replica["replicas"] >= 1
        assert replica["restartPolicy"] in ("Always", "OnFailure", "Never", "ExitCode")
        # The operator injects TF_CONFIG into, and watches, the container named "tensorflow".
        (container,) = [c for c in replica["template"]["spec"]["containers"] if c["name"] == "tensorflow"]
        containers[kind] = container
    first = containers["Chief"]
    for container in containers.values():
        assert (container["image"], container["command"], container["args"]) == (
            first["image"], first["command"], first["args"])
    assert first["command"] == ["python", "-m", "components.trainer"]
    with open(os.path.join(REPO, "configs", "kubeflow.yaml")) as f:
        assert first["image"] == yaml.safe_load(f)["image"]  # the image the pipeline runs
    args = argument_parser().parse_args(first["args"])
    spec = spec_with_strategy(feature_spec.load(args.spec), args.strategy)
    expected = "parameter_server" if "PS" in replicas else "multi_worker"
    assert spec.training.strategy["type"] == expected
