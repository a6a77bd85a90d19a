"""Shared fixtures: the taxi spec, CSV samples, and a small model trained without a pipeline.

The small model goes through the real code (preprocessing_fn under tf.Transform's Beam
implementation, the tf.data feeder, train_and_export with its signatures) on ~1,500 taxi
rows, so signature and trainer tests take seconds instead of a pipeline run.
"""

import csv
import dataclasses
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before TensorFlow is imported anywhere
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

from components import feature_spec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAXI_SPEC = os.path.join(REPO, "configs", "taxi.yaml")
PARSE = {"int": int, "float": float, "string": str}


@pytest.fixture(scope="session")
def taxi_spec():
    return feature_spec.load(TAXI_SPEC)


def taxi_csv_path(spec) -> str:
    return spec.csv_files()[0]


def read_rows(path, limit=None):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return rows[:limit] if limit else rows


def write_sample(rows, folder, name="data.csv"):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    return path


def raw_types(spec):
    """{column: type} of every raw column Transform reads: the spec's, and with spec `served` the
    policy and propensity columns a served span carries."""
    types = {name: f.type for name, f in spec.columns.items()}
    if spec.served:
        types.update({spec.served.policy_column: "string", spec.served.propensity_column: "float"})
    return types


def to_instance(row, spec):
    """A CSV row as tf.Transform's instance dict: an empty cell is an empty value list."""
    return {name: ([] if row[name] == "" else [PARSE[t](row[name])]) for name, t in raw_types(spec).items()}


def fast_spec(spec, **training):
    defaults = dict(schedule=(feature_spec.Stage(0.005, 64, 4),), deterministic=True, seed=7)
    defaults.update(training)
    return dataclasses.replace(spec, training=dataclasses.replace(spec.training, **defaults))


def analyze_and_transform(spec, train_rows, eval_rows, out_dir):
    """Runs preprocessing_fn with tf.Transform's Beam implementation, the way Transform does.

    Writes the transform graph to out_dir/transform_graph and GZIP TFRecords of transformed
    examples to out_dir/{train,eval}/; returns (transform_graph_dir, train_pattern, eval_pattern).
    """
    import apache_beam as beam
    import tensorflow as tf
    import tensorflow_transform.beam as tft_beam
    import tensorflow_transform as tft
    from tensorflow_transform.tf_metadata import dataset_metadata, metadata_io, schema_utils

    from components.preprocessing import FORCE_TF_COMPAT_V1, preprocessing_fn

    dtypes = {"int": tf.int64, "float": tf.float32, "string": tf.string}
    raw_spec = {n: tf.io.VarLenFeature(dtypes[t]) for n, t in raw_types(spec).items()}
    metadata = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(raw_spec))
    custom_config = spec.to_custom_config()
    graph_dir = os.path.join(out_dir, "transform_graph")
    context = tft_beam.Context(temp_dir=os.path.join(out_dir, "tmp"), force_tf_compat_v1=FORCE_TF_COMPAT_V1)
    with beam.Pipeline() as p, context:
        train = p | "train" >> beam.Create([to_instance(r, spec) for r in train_rows])
        evaluation = p | "eval" >> beam.Create([to_instance(r, spec) for r in eval_rows])
        (transformed, _), transform_fn = (train, metadata) | tft_beam.AnalyzeAndTransformDataset(
            lambda inputs: preprocessing_fn(inputs, custom_config))
        transformed_eval, _ = ((evaluation, metadata), transform_fn) | tft_beam.TransformDataset()
        _ = transform_fn | tft_beam.WriteTransformFn(graph_dir)
        for name, data in (("train", transformed), ("eval", transformed_eval)):
            _ = (data | f"encode_{name}" >> beam.Map(_encode)
                 | f"write_{name}" >> beam.io.WriteToTFRecord(os.path.join(out_dir, name, "part"),
                                                              file_name_suffix=".gz"))
    # Transform also records the raw schema beside the graph (read by raw_feature_spec()).
    metadata_io.write_metadata(metadata, os.path.join(graph_dir, tft.TFTransformOutput.RAW_METADATA_DIR))
    return graph_dir, os.path.join(out_dir, "train", "*"), os.path.join(out_dir, "eval", "*")


def _encode(instance):
    import numpy as np
    import tensorflow as tf

    feature = {}
    for k, v in instance.items():
        if np.issubdtype(np.asarray(v).dtype, np.integer):
            feature[k] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v)]))
        else:
            feature[k] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(v)]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


@pytest.fixture(scope="session")
def taxi_rows(taxi_spec):
    return read_rows(taxi_csv_path(taxi_spec), limit=1800)


@pytest.fixture(scope="session")
def small_transform(taxi_spec, taxi_rows, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("small_transform"))
    return analyze_and_transform(taxi_spec, taxi_rows[:1500], taxi_rows[1500:], out)


@pytest.fixture(scope="session")
def small_model(taxi_spec, small_transform, tmp_path_factory):
    """(model_dir, eval metrics) of a model trained by train_and_export on the small transform."""
    from components.trainer import train_and_export

    graph_dir, train_files, eval_files = small_transform
    model_dir = str(tmp_path_factory.mktemp("small_model") / "model")
    metrics = train_and_export(fast_spec(taxi_spec), graph_dir, [train_files], [eval_files], model_dir)
    return model_dir, metrics


def write_models_config(root, labels=None, num_latest=2, base_paths=None):
    """<root>/models.config serving every model folder under root (latest `num_latest` versions)
    with `labels` ({model: {label: version}}): the file `make promote` writes, for tests."""
    from serving import model_config

    labels = labels or {}
    config = model_config.ModelServerConfig()
    for name in sorted(os.listdir(root)):
        if os.path.isdir(os.path.join(root, name)):
            model = config.model_config_list.config.add(name=name, base_path=os.path.join(str(root), name))
            model.model_version_policy.latest.num_versions = num_latest
            for label, version in labels.get(name, {}).items():
                model.version_labels[label] = version
    return model_config.write(os.path.join(str(root), model_config.MODEL_CONFIG_FILE), config)


def serve(root, labels=None, num_latest=2, poll_seconds=3600.0, grpc=False, batcher=None, **server_args):
    """A started local server (REST, and gRPC with grpc=True) over every model under root;
    `.servables.repository` is the repository, `.url` the REST root. Stop it with .stop()."""
    from serving.core import Servables, warm
    from serving.repository import Repository
    from serving.server import LocalServer

    path = write_models_config(root, labels, num_latest)
    repo = Repository(config_file=path, poll_seconds=poll_seconds, config_poll_seconds=poll_seconds, warmup=warm)
    servables = Servables(repo, batcher)
    return LocalServer(servables, rest_port=0, grpc_port=0 if grpc else None, **server_args).start()


# --- a real PostgreSQL server on loopback, for the prediction log's PostgreSQL store ----------

REQUIRE_POSTGRES = "SKEWLESS_REQUIRE_POSTGRES"  # set by .ci/run: a missing server fails instead of skipping
POSTGRES_PASSWORD = "s3cret-for-tests"


def _postgres_unavailable(reason):
    if os.environ.get(REQUIRE_POSTGRES) == "1":
        pytest.fail(f"{reason} ({REQUIRE_POSTGRES}=1; deploy/scripts/install-postgresql.sh installs it)",
                    pytrace=False)
    pytest.skip(reason)


def _postgres_bin():
    """The folder of Debian's `postgres`/`initdb` (newest version), else one on PATH, else None."""
    import glob
    import shutil

    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True):
        if os.path.exists(os.path.join(folder, "initdb")):
            return folder
    found = shutil.which("initdb")
    return os.path.dirname(os.path.realpath(found)) if found else None


class PostgresServer:
    """`postgres` started on 127.0.0.1 in a throw-away data folder, password authentication on TCP."""

    def __init__(self, bin_dir, folder, port, run_as):
        self.bin_dir, self.folder, self.port, self.run_as = bin_dir, folder, port, run_as
        self.process = None

    def url(self, database="postgres", password=POSTGRES_PASSWORD, port=None):
        return f"postgresql://skewless:{password}@127.0.0.1:{port or self.port}/{database}"

    def _run(self, *command, **kwargs):
        import subprocess

        return subprocess.run(command, cwd=self.folder, capture_output=True, text=True, **self.run_as, **kwargs)

    def start(self, timeout=30.0):
        import subprocess
        import time

        import psycopg

        password_file = os.path.join(self.folder, "password")
        with open(password_file, "w") as f:
            f.write(POSTGRES_PASSWORD)
        data = os.path.join(self.folder, "data")
        done = self._run(os.path.join(self.bin_dir, "initdb"), "-D", data, "-U", "skewless", "--pwfile",
                         password_file, "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8",
                         "--locale=C", "--no-sync")
        if done.returncode:
            raise RuntimeError(f"initdb failed: {done.stdout}{done.stderr}")
        # Durability off: a test server's data is thrown away.
        with open(os.path.join(self.folder, "server.log"), "w") as server_log:
            self.process = subprocess.Popen(
                [os.path.join(self.bin_dir, "postgres"), "-D", data, "-k", self.folder, "-h", "127.0.0.1",
                 "-p", str(self.port), "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                cwd=self.folder, stdout=subprocess.DEVNULL, stderr=server_log, **self.run_as)
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return self
            except psycopg.OperationalError as e:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    with open(os.path.join(self.folder, "server.log")) as f:
                        raise RuntimeError(f"postgres did not start on port {self.port}: {e}\n{f.read()}") from None
                time.sleep(0.05)

    def create_database(self):
        import uuid

        import psycopg

        name = f"log_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self):
        import signal
        import subprocess

        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown: ends client sessions, no waiting for them
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="session")
def postgres_server():
    """One PostgreSQL server per test process (each xdist worker has its own), on a free port.
    Skipped when the binaries are absent, unless SKEWLESS_REQUIRE_POSTGRES=1 (then it fails)."""
    import pwd
    import shutil
    import socket
    import tempfile

    try:
        import psycopg  # noqa: F401
    except ImportError:
        _postgres_unavailable("psycopg is not installed (requirements/lock.txt pins it; make setup)")
    bin_dir = _postgres_bin()
    if bin_dir is None or not os.path.exists(os.path.join(bin_dir, "postgres")):
        _postgres_unavailable("no PostgreSQL server binaries (initdb, postgres) in /usr/lib/postgresql/*/bin or PATH")
    run_as = {}
    folder = tempfile.mkdtemp(prefix="skewless-pg-")  # under /tmp: the postgres user must reach it
    if os.geteuid() == 0:  # postgres refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            _postgres_unavailable("running as root and there is no 'postgres' user to run the server as")
        os.chown(folder, user.pw_uid, user.pw_gid)
        run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = PostgresServer(bin_dir, folder, port, run_as)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server):
    """The URL (with password) of a new, empty database on the test server: each test its own."""
    return postgres_server.create_database()


CONSOLE_NOISE = ("INFO", "cuDNN", "cuFFT", "cuBLAS", "Traceback", "WARNING:", "Deprecat")


def component_lines(stdout: str) -> "collections.Counter":
    """{node: how many end-of-component lines} in a run's console output (pipelines/console.py's
    ProgressWatcher: '  <node>  done|cached|FAILED  <seconds> s'), after checking that every line of
    the run's progress is one of those or a 'running' progress line."""
    import collections
    import re

    ended = re.compile(r"^  (\S+) +(done|cached|FAILED|CANCELED) +\d+\.\d s$")
    running = re.compile(r"^  \S+ +running +\d+ s$")
    lines = stdout.splitlines()
    assert lines and lines[0].startswith("skewless: running pipeline"), lines[:3]
    counts = collections.Counter()
    for line in lines[1:]:
        if not line.startswith("  "):
            break  # the summary (pipelines/report.py's print_summary) or nothing
        match = ended.match(line)
        assert match or running.match(line) or line.startswith("  warning: "), line
        if match:
            counts[match.group(1)] += 1
    return counts
