"""Version-skew guard (issue 3, point 6) and the TF Serving and training images' files.

Fails when the TensorFlow of the training lock, the training image, the serving environment and
the TF Serving image disagree (major.minor), when an exported graph uses an op the serving
TensorFlow does not register, when the serving image could contain training code or run as root,
when the training image could contain build output or a virtualenv or run as root, and when a
serving config does not parse as the proto TF Serving reads it into. No Docker needed.
"""

import importlib
import json
import os
import posixpath
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from google.protobuf import text_format

from serving import versions

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "serving" / "config"


# --- TensorFlow versions -------------------------------------------------------------------

def test_training_serving_and_image_pin_the_same_tensorflow():
    found = versions.tensorflow_versions(REPO)
    assert all(re.match(r"\d+\.\d+", v) for v in found.values()), found  # the real pins were read
    # The op checks below ask this environment's TensorFlow: it must be the one pinned.
    found["tensorflow installed in this environment"] = metadata.version("tensorflow")
    versions.check_versions_agree(found)


def _write_pins(root, lock="2.16.2", serving="2.16.2", image="2.16.1", train_pin=None):
    (root / "requirements").mkdir()
    (root / "serving").mkdir()
    (root / versions.TRAINING_LOCK).write_text(
        f"tensorflow-transform==1.16.0\ntensorflow=={lock}\n    # via tfx\ntf-keras==2.16.0\n")
    (root / versions.SERVING_REQUIREMENTS).write_text(f"# serving\ntensorflow=={serving}  # pinned\n")
    (root / versions.SERVING_DOCKERFILE).write_text(
        f"ARG RELEASE=model-load\nFROM tensorflow/serving:{image} AS serving-base\nUSER 10001\n")
    # The training image installs the lock (traced back through COPY), or pins its own TensorFlow.
    install = (f"RUN pip install tensorflow=={train_pin}\n" if train_pin else
               "COPY requirements/ req/\nRUN pip install --no-deps \\\n    -r req/lock.txt\n")
    (root / versions.TRAINING_DOCKERFILE).write_text(f"FROM python:3.10-slim\nWORKDIR /src\n{install}USER 10001\n")


@pytest.mark.parametrize("wrong_file, pins", [
    (versions.SERVING_DOCKERFILE, dict(image="2.15.0")),
    (versions.TRAINING_DOCKERFILE, dict(train_pin="2.15.1")),
    (versions.SERVING_REQUIREMENTS, dict(serving="2.17.0")),
    (versions.SERVING_REQUIREMENTS, dict(serving="3.16.2")),  # major counts too
])
def test_disagreeing_versions_fail_naming_the_file(tmp_path, wrong_file, pins):
    _write_pins(tmp_path, **pins)
    found = versions.tensorflow_versions(tmp_path)
    with pytest.raises(versions.VersionSkew) as error:
        versions.check_versions_agree(found)
    message = str(error.value)
    assert f"{wrong_file} has {found[wrong_file]}" in message
    assert "requirements/lock.txt pins 2.16.2" in message


def test_training_lock_that_moved_on_fails_against_both_serving_files(tmp_path):
    _write_pins(tmp_path, lock="2.17.1")
    with pytest.raises(versions.VersionSkew, match="serving/requirements.txt has 2.16.2; Dockerfile.serve has 2.16.1"):
        versions.check_versions_agree(versions.tensorflow_versions(tmp_path))


def test_training_image_follows_the_lock_it_installs(tmp_path):
    _write_pins(tmp_path, lock="2.17.1", serving="2.17.0", image="2.17.0")
    assert versions.tensorflow_versions(tmp_path)[versions.TRAINING_DOCKERFILE] == "2.17.1"


@pytest.mark.parametrize("dockerfile, expected", [
    ("FROM tensorflow/tfx:1.16.0\nUSER 10001\n", "2.16"),
    ("FROM tensorflow/tfx:1.15.1\nCOPY requirements/lock.txt /l.txt\nRUN pip install -r /l.txt\n", None),
    ("FROM python:3.10\nCOPY requirements/lock.txt /l.txt\nRUN pip install -r /l.txt tensorflow==2.15.0\n", None),
    ("FROM python:3.10\nRUN pip install -r /nowhere.txt\n", "no COPY brings"),
    ("FROM python:3.10\nRUN pip install tfx\n", "cannot tell which TensorFlow"),
])
def test_training_image_tensorflow_from_base_pins_and_lock(tmp_path, dockerfile, expected):
    _write_pins(tmp_path)
    path = tmp_path / versions.TRAINING_DOCKERFILE
    path.write_text(dockerfile)
    if expected is None:  # the lock's 2.16 against another release in the same image
        with pytest.raises(versions.VersionSkew, match=r"Dockerfile.train: installs several TensorFlow releases: "
                                                       r".*requirements/lock.txt has 2.16.2"):
            versions.training_image_tensorflow(path, tmp_path)
    elif expected[0].isdigit():
        assert versions.major_minor(versions.training_image_tensorflow(path, tmp_path)) == expected
    else:
        with pytest.raises(ValueError, match=f"Dockerfile.train: .*{expected}"):
            versions.training_image_tensorflow(path, tmp_path)


def test_patch_releases_may_differ(tmp_path):
    _write_pins(tmp_path, lock="2.16.2", serving="2.16.0", image="2.16.1")
    versions.check_versions_agree(versions.tensorflow_versions(tmp_path))


@pytest.mark.parametrize("from_line", ["FROM tensorflow/serving", "FROM tensorflow/serving:latest",
                                       "FROM tensorflow/serving:${TF_SERVING_TAG}", "FROM ubuntu:22.04"])
def test_an_unpinned_serving_image_is_an_error(tmp_path, from_line):
    (tmp_path / "Dockerfile.serve").write_text(from_line + "\n")
    with pytest.raises(ValueError, match="Dockerfile.serve"):
        versions.serving_image_tensorflow(tmp_path / "Dockerfile.serve")


def test_serving_requirements_pin_what_training_pins_and_no_training_library():
    lock = versions.pins(REPO / versions.TRAINING_LOCK)
    serving = versions.pins(REPO / versions.SERVING_REQUIREMENTS)
    assert {"tensorflow", "tf-keras", "numpy", "prometheus-client"} <= set(serving)
    assert {name: v for name, v in serving.items() if lock.get(name) != v} == {}, "pins differ from the lock"
    training_only = {"tfx", "tensorflow-transform", "apache-beam", "tensorflow-data-validation",
                     "tensorflow-model-analysis", "tfx-bsl", "ml-metadata"}
    assert training_only.isdisjoint(serving)


# --- ops the serving TensorFlow must register ----------------------------------------------

@pytest.fixture(scope="module")
def tiny_saved_model(tmp_path_factory):
    """A lookup table behind a string op, like the taxi model's vocabularies."""
    import tensorflow as tf

    class Tiny(tf.Module):
        def __init__(self):
            super().__init__()
            init = tf.lookup.KeyValueTensorInitializer(["cash", "credit card"], [0, 1], tf.string, tf.int64)
            self.table = tf.lookup.StaticHashTable(init, default_value=-1)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def payment_id(self, payment_type):
            return {"id": self.table.lookup(tf.strings.lower(payment_type))}

    module = Tiny()
    path = tmp_path_factory.mktemp("tiny_saved_model") / "1"
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.payment_id})
    return path


def test_graph_of_a_saved_model_uses_only_registered_ops(tiny_saved_model):
    assert versions.unsupported_ops(tiny_saved_model, versions.registered_op_names()) == set()


def test_an_op_missing_from_the_serving_registry_is_named(tiny_saved_model):
    from tensorflow.core.protobuf import saved_model_pb2

    registry = versions.registered_op_names()
    assert {"StringLower", "LookupTableFindV2", "HashTableV2"} <= versions.graph_ops(tiny_saved_model)
    assert versions.unsupported_ops(tiny_saved_model, registry - {"StringLower"}) == {"StringLower"}
    # StringLower lives only in a function body: found because the function library is read.
    saved = saved_model_pb2.SavedModel.FromString((tiny_saved_model / "saved_model.pb").read_bytes())
    assert "StringLower" not in {node.op for node in saved.meta_graphs[0].graph_def.node}


def test_the_exported_taxi_model_loads_in_a_tensorflow_only_process(small_model):
    """The real export (preprocessing inside) against a process that imported TensorFlow only.

    In this process tensorflow_transform and the rest of training are loaded: any op library
    they registered would hide an op that the serving TensorFlow lacks.
    """
    model_dir, _ = small_model
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    run = subprocess.run([sys.executable, "-m", "serving.versions", "ops", model_dir],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all ops registered" in run.stdout


# --- the TF Serving image --------------------------------------------------------------------

def _instructions(text):
    return list(versions.dockerfile_instructions(text))


def _substitute(text, variables):
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m[1], ""), text)


def _stages(text):
    """Global ARG defaults and {stage: (base, instructions)}; the final stage is the last key."""
    arguments, stages, current = {}, {}, None
    for keyword, rest in _instructions(text):
        if keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else f"stage-{len(stages)}"
            current = stages[name] = (words[0], [])
        elif current is None and keyword == "ARG":
            key, _, default = rest.partition("=")
            arguments[key] = default
        elif current is not None:
            current[1].append((keyword, rest))
    return arguments, stages


def _image(stages, stage, variables):
    """Instructions that make up a stage's image: its ancestors' first, ARGs resolved in COPY."""
    lineage = []
    while stage in stages:
        lineage.insert(0, stages[stage][1])
        stage = _substitute(stages[stage][0], variables)
    found, local = [], dict(variables)
    for keyword, rest in (i for instructions in lineage for i in instructions):
        if keyword == "ARG":
            key, _, default = rest.partition("=")
            local.setdefault(key, default)
        found.append((keyword, _substitute(rest, local) if keyword in ("COPY", "ADD") else rest))
    return found


def _context_sources(stages, stage, variables):
    """Build-context paths COPY/ADD bring into a stage's image, through COPY --from=<stage> too."""
    sources = []
    for keyword, rest in _image(stages, stage, variables):
        if keyword not in ("COPY", "ADD"):
            continue
        body = re.sub(r"^(?:--\S+\s+)*", "", rest)
        flags = dict(re.findall(r"--([\w-]+)=(\S+)", rest[:len(rest) - len(body)]))
        paths = (json.loads(body) if body.startswith("[") else body.split())[:-1]
        if "from" in flags:  # another stage's files (an outside image brings no context files)
            sources += _context_sources(stages, flags["from"], variables) if flags["from"] in stages else []
        else:
            sources += paths
    return sources


def _may_include(source, path):
    source = posixpath.normpath(source.lstrip("/"))
    if re.search(r"[*?\[]", source):  # a glob: judge by the folder it starts in
        source = posixpath.dirname(re.split(r"[*?\[]", source)[0]) or "."
    return source == "." or source == path or source.startswith(path + "/") or path.startswith(source + "/")


def image_problems(dockerfile_text, **build_args):
    """What is wrong with the final image of a Dockerfile for the serving image's rules."""
    arguments, stages = _stages(dockerfile_text)
    variables = {**arguments, **build_args}
    final = list(stages)[-1]
    problems = [f"COPY {source} may bring {path} into the image"
                for source in _context_sources(stages, final, variables)
                for path in ("components", "pipelines", "requirements/lock.txt") if _may_include(source, path)]
    image = _image(stages, final, variables)
    problems += [f"RUN installs packages: {rest}" for keyword, rest in image
                 if keyword == "RUN" and re.search(r"\b(pip|pip3|apt-get|apt|conda)\s+install\b", rest)]
    users = [rest.split(":")[0] for keyword, rest in image if keyword == "USER"]
    if not users or not users[-1].isdigit() or int(users[-1]) == 0:
        problems.append(f"USER is {users[-1] if users else 'unset (root)'}: it must be a non-zero numeric uid")
    return problems


@pytest.mark.parametrize("release", ["model-load", "model-in-image"])
def test_serving_image_holds_no_training_code_and_runs_unprivileged(release):
    text = (REPO / versions.SERVING_DOCKERFILE).read_text()
    assert image_problems(text, RELEASE=release) == []


def test_image_rules_catch_training_code_and_root():
    bad = """
        FROM python:3.11 AS trainer
        COPY requirements/ /req/
        COPY components/ /app/components/
        FROM tensorflow/serving:2.16.1
        COPY --from=trainer /app /app
        COPY serving/config/*.config /etc/tfserving/
        RUN pip install -r /req/lock.txt
        USER serving
    """
    problems = image_problems(bad)
    assert any("requirements/ may bring requirements/lock.txt" in p for p in problems)
    assert any("components/ may bring components" in p for p in problems)
    assert any("RUN installs packages" in p for p in problems)
    assert any("USER is serving" in p for p in problems)
    assert "USER is unset (root)" in image_problems("FROM tensorflow/serving:2.16.1\n")[0]


# --- the training image ----------------------------------------------------------------------

def test_training_image_holds_what_the_pipeline_runs_no_build_output_and_runs_unprivileged():
    text = (REPO / versions.TRAINING_DOCKERFILE).read_text()
    arguments, stages = _stages(text)
    final = list(stages)[-1]
    sources = _context_sources(stages, final, arguments)
    for path in ("build", "build/model_repository", ".venv", "tests", ".git"):
        assert not [s for s in sources if _may_include(s, path)], f"the image may get {path}: {sources}"
    # The sandbox component starts serving.server in a subprocess: serving/ must be there too.
    assert {"components/", "pipelines/", "serving/", "configs/", "pyproject.toml"} <= set(sources)
    image = _image(stages, final, arguments)
    uid = [rest for keyword, rest in image if keyword == "USER"][-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    # KFP's launcher writes input artifacts under /gcs, /minio and /s3: the uid must own them.
    setup = " ".join(rest for keyword, rest in image if keyword == "RUN")
    assert all(d in setup for d in ("/gcs", "/minio", "/s3")) and f"chown {uid}:" in setup
    assert re.search(r"\bTF_USE_LEGACY_KERAS=1\b", " ".join(rest for keyword, rest in image if keyword == "ENV"))


def test_training_image_python_and_beam_workers_match_the_lock():
    arguments, _ = _stages((REPO / versions.TRAINING_DOCKERFILE).read_text())
    lock = versions.pins(REPO / versions.TRAINING_LOCK)
    python = re.fullmatch(r"python:(\d+\.\d+)[-.\w]*", arguments["PYTHON_IMAGE"])
    beam = re.fullmatch(r"apache/beam_python(\d+\.\d+)_sdk:(\S+)", arguments["BEAM_SDK_IMAGE"])
    resolved_for = re.search(r"--python-version (\d+\.\d+)", (REPO / "Makefile").read_text())[1]
    assert python[1] == beam[1] == resolved_for  # the Python `make lock` resolves the lock for
    assert beam[2] == lock["apache-beam"]  # SDK workers refuse a job submitted by another Beam release


def test_training_build_context_is_what_the_dockerfile_copies():
    arguments, stages = _stages((REPO / versions.TRAINING_DOCKERFILE).read_text())
    copied = {s for stage in stages for s in _context_sources(stages, stage, arguments)}
    rules = [line.strip() for line in (REPO / "Dockerfile.train.dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"  # nothing is sent to the builder unless re-included below
    included = {rule[1:] for rule in rules if rule.startswith("!")}
    assert included == copied  # every copied path reaches the builder, and nothing else does
    assert not [p for p in included if _may_include(p, "build") or _may_include(p, ".venv")]

# --- serving configs parse as the protos TF Serving reads --------------------------------------

def _upstream_mirror():
    """tensorflow-serving-api ships neither session_bundle_config_pb2 nor monitoring_config_pb2:
    serving/upstream_protos.py builds them from upstream's definitions, for the server too."""
    from serving.upstream_protos import message_class

    return message_class


def _proto(module, name):
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        return _upstream_mirror()(name)


def _parse(path, message_class):
    return text_format.Parse(Path(path).read_text(), message_class())


def _check_model_config(config, version=None):
    """One model, taxi at /models/taxi, labels only on versions the policy loads."""
    (model,) = config.model_config_list.config
    assert (model.name, model.base_path, model.model_platform) == ("taxi", "/models/taxi", "tensorflow")
    assert model.model_version_policy.WhichOneof("policy_choice") == "specific"
    loaded = set(model.model_version_policy.specific.versions)
    # TF Serving refuses a label on a version that is not loaded (no
    # --allow_version_labels_for_unavailable_models here), and clients ask for `stable`.
    assert "stable" in model.version_labels
    assert set(model.version_labels.values()) <= loaded
    assert set(model.version_labels) <= {"stable", "canary"}
    if version is not None:
        assert loaded == {version} and dict(model.version_labels) == {"stable": version}


def test_model_in_image_config_labels_the_baked_version_stable():
    from tensorflow_serving.config import model_server_config_pb2

    run = next(rest for keyword, rest in _instructions((REPO / versions.SERVING_DOCKERFILE).read_text())
               if keyword == "RUN" and "models.config" in rest)
    template = re.search(r"printf '([^']*)'", run)[1]
    written = subprocess.run(["sh", "-c", f"printf '{template}' 1795242246 1795242246"],
                             capture_output=True, text=True, check=True).stdout
    config = text_format.Parse(written, model_server_config_pb2.ModelServerConfig())
    _check_model_config(config, version=1795242246)


def test_batching_config_parses_as_batching_parameters():
    batching = _parse(CONFIG / "batching.config", _proto(
        "tensorflow_serving.servables.tensorflow.session_bundle_config_pb2", "BatchingParameters"))
    assert batching.num_batch_threads.value >= 1
    assert batching.max_enqueued_batches.value >= 1
    # A request with more rows than max_batch_size is rejected: keep room above a 100-row batch.
    assert batching.max_batch_size.value >= 100


def test_monitoring_config_exposes_prometheus_where_tf_serving_documents_it():
    monitoring = _parse(CONFIG / "monitoring.config", _proto(
        "tensorflow_serving.config.monitoring_config_pb2", "MonitoringConfig"))
    assert monitoring.prometheus_config.enable
    assert monitoring.prometheus_config.path == "/monitoring/prometheus/metrics"


def test_proxy_image_holds_the_proxy_only_with_locked_pins_for_all_it_imports():
    text = (REPO / "Dockerfile.proxy").read_text()
    arguments, stages = _stages(text)
    final = list(stages)[-1]
    sources = _context_sources(stages, final, arguments)
    assert sorted(sources) == ["serving/__init__.py", "serving/http.py", "serving/logstore.py", "serving/predlog.py",
                               "serving/proxy.py", "serving/repository_layout.py", "serving/retention.py", "serving/typed_config.py",
                               "serving/wire.py"]
    # What the proxy imports beyond the standard library is what the image installs, at the lock's
    # pins, and so is everything those packages need on the image's Python (installed --no-deps).
    installs = [rest for keyword, rest in _image(stages, final, arguments) if keyword == "RUN" and "pip install" in rest]
    assert all("--no-deps" in rest for rest in installs)
    pins = dict(re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s\\]*)", " ".join(installs)))
    lock = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO / "requirements" / "lock.txt").read_text(), re.M))
    assert {name: lock.get(name) for name in pins} == pins
    from importlib import metadata

    from packaging.requirements import Requirement
    python = {"python_version": "3.11", "python_full_version": "3.11.0", "sys_platform": "linux", "extra": "",
              "platform_system": "Linux", "platform_python_implementation": "CPython", "implementation_name": "cpython",
              "platform_machine": "x86_64", "os_name": "posix"}
    wanted, seen = ["aiohttp", "prometheus-client", "psycopg", "psycopg-binary", "pydantic"], set()
    while wanted:
        name = wanted.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        for requirement in map(Requirement, metadata.requires(name) or []):
            if requirement.marker is None or requirement.marker.evaluate(python):
                wanted.append(requirement.name)
    assert seen == set(pins), f"installed without their dependencies: {sorted(seen - set(pins))}; " \
                              f"not needed: {sorted(set(pins) - seen)}"
    users = [rest for keyword, rest in _image(stages, final, arguments) if keyword == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) != 0
    ignored = (REPO / "Dockerfile.proxy.dockerignore").read_text().split()
    assert "*" in ignored and {f"!{s}" for s in sources} <= set(ignored)
