"""The local server as an operator meets it: models.config (policies, labels, polling, reload),
failed and half-written versions, server-side batching, slow and hostile clients.

Repository tests use tiny SavedModels (y = k * x) so each loads in well under a second; the
batching test uses the small taxi model. TF Serving references as in test_serving_conformance.py.
"""

import concurrent.futures
import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.conftest import serve


def tiny_model(path, k: float) -> str:
    """A SavedModel whose serving_default maps x (float, [None]) to y = k * x."""
    import tensorflow as tf

    class Times(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
        def serve(self, x):
            return {"y": x * k}

    module = Times()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Three built versions to copy around: {k: path}."""
    root = tmp_path_factory.mktemp("tiny")
    return {k: tiny_model(root / str(k), float(k)) for k in (1, 2, 3)}


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def predict(url, path="/v1/models/m:predict", x=1.0):
    request = urllib.request.Request(url + path, data=json.dumps({"instances": [x]}).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def states(url, model="m"):
    code, body = get(f"{url}/v1/models/{model}")
    return {int(s["version"]): s["state"] for s in body.get("model_version_status", [])} if code == 200 else {}


def wait_for(condition, seconds=30.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def repository_server(root, config_text, server_args=None, **kwargs):
    from serving.core import Servables, warm
    from serving.repository import Repository
    from serving.server import LocalServer

    path = root / "models.config"
    path.write_text(config_text)
    repo = Repository(config_file=str(path), warmup=warm, **kwargs)
    server = LocalServer(Servables(repo), rest_port=0, grpc_port=0, **(server_args or {})).start()
    repo.start()
    stop = server.stop

    def stop_both():
        repo.stop()
        stop()
    server.stop = stop_both
    return server


def config(root, name="m", policy="", labels=None):
    text = f'model_config_list {{ config {{ name: "{name}" base_path: "{root / name}" model_platform: "tensorflow" '
    text += policy + "".join(f' version_labels {{ key: "{k}" value: {v} }}' for k, v in (labels or {}).items())
    return text + " } }"


# --- version policies and labels (file_system_storage_path_source.proto, SC:549-614) ----------

def test_version_policies_pick_versions_from_disk(tiny, tmp_path):
    for v in (1, 2, 3):
        shutil.copytree(tiny[v], tmp_path / "m" / str(v))
    cases = {"": {3}, "model_version_policy { latest { num_versions: 2 } }": {2, 3},
             "model_version_policy { all {} }": {1, 2, 3}, "model_version_policy { specific { versions: 1 versions: 3 } }": {1, 3}}
    for policy, want in cases.items():
        server = repository_server(tmp_path, config(tmp_path, policy=policy), poll_seconds=3600)
        try:
            assert {v for v, s in states(server.url).items() if s == "AVAILABLE"} == want, policy
            assert predict(server.url, x=2.0)[1] == {"predictions": [2.0 * max(want)]}  # latest answers
        finally:
            server.stop()


def test_labels_come_from_models_config_and_may_only_name_loaded_versions(tiny, tmp_path):
    for v in (1, 2):
        shutil.copytree(tiny[v], tmp_path / "m" / str(v))
    policy = "model_version_policy { all {} }"
    server = repository_server(tmp_path, config(tmp_path, policy=policy, labels={"stable": 1}), poll_seconds=0.1,
                               config_poll_seconds=0.1)
    try:
        assert predict(server.url, "/v1/models/m/labels/stable:predict", 3.0) == (200, {"predictions": [3.0]})
        # A label on a version that is not loaded is refused whole (SC:574-584): stable stays on 1.
        (tmp_path / "models.config").write_text(config(tmp_path, policy=policy, labels={"stable": 2, "canary": 9}))
        time.sleep(0.5)
        assert predict(server.url, "/v1/models/m/labels/stable:predict", 3.0) == (200, {"predictions": [3.0]})
        assert predict(server.url, "/v1/models/m/labels/canary:predict")[0] == 400  # still unknown
        (tmp_path / "models.config").write_text(config(tmp_path, policy=policy, labels={"stable": 2, "canary": 1}))
        assert wait_for(lambda: predict(server.url, "/v1/models/m/labels/stable:predict", 3.0)[1] == {"predictions": [6.0]})
        assert predict(server.url, "/v1/models/m/labels/canary:predict", 3.0) == (200, {"predictions": [3.0]})
        # A config that does not parse leaves the one in force (server_core keeps its config).
        (tmp_path / "models.config").write_text("model_config_list { config { name: ")
        time.sleep(0.5)
        assert predict(server.url, "/v1/models/m/labels/stable:predict", 3.0) == (200, {"predictions": [6.0]})
    finally:
        server.stop()


def test_several_models_and_a_reload_over_grpc(tiny, tmp_path):
    import grpc
    from google.protobuf import text_format
    from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc
    from tensorflow_serving.config import model_server_config_pb2

    for name, v in (("m", 1), ("n", 2)):
        shutil.copytree(tiny[v], tmp_path / name / "1")
    server = repository_server(tmp_path, config(tmp_path, "m"), poll_seconds=3600)
    try:
        assert predict(server.url, x=1.0)[1] == {"predictions": [1.0]}
        assert predict(server.url, "/v1/models/n:predict")[0] == 404
        both = config(tmp_path, "m")[:-2] + config(tmp_path, "n")[len("model_config_list { "):]
        request = model_management_pb2.ReloadConfigRequest()
        text_format.Parse(both, request.config)
        stub = model_service_pb2_grpc.ModelServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
        assert stub.HandleReloadConfigRequest(request, timeout=30).status.error_code == 0
        assert predict(server.url, "/v1/models/n:predict", 1.0)[1] == {"predictions": [2.0]}
        duplicate = model_server_config_pb2.ModelServerConfig()
        text_format.Parse(config(tmp_path, "m")[:-2] + config(tmp_path, "m")[len("model_config_list { "):], duplicate)
        request.config.CopyFrom(duplicate)
        answer = stub.HandleReloadConfigRequest(request, timeout=30)
        assert answer.status.error_code == 3 and "appears twice" in answer.status.error_message
    finally:
        server.stop()


# --- failed and half-written versions (loader_harness.cc, availability_preserving_policy.cc) ---

def test_a_half_written_version_never_takes_traffic_and_a_failed_load_is_retried(tiny, tmp_path):
    shutil.copytree(tiny[1], tmp_path / "m" / "1")
    server = repository_server(tmp_path, config(tmp_path), poll_seconds=0.05, max_num_load_retries=3,
                               load_retry_interval=0.3)
    try:
        os.makedirs(tmp_path / "m" / "2" / "variables")  # a push in progress: no saved_model.pb yet
        assert wait_for(lambda: states(server.url).get(2) == "LOADING")
        answered = [predict(server.url, x=1.0) for _ in range(20)]
        assert answered == [(200, {"predictions": [1.0]})] * 20  # version 1 serves throughout
        shutil.rmtree(tmp_path / "m" / "2")
        shutil.copytree(tiny[2], tmp_path / "m" / "2")  # the push completes: the next try loads it
        assert wait_for(lambda: predict(server.url, x=1.0)[1] == {"predictions": [2.0]})
        assert states(server.url) == {2: "AVAILABLE", 1: "END"}  # then 1 is unloaded (latest 1)
        # A version that never loads: END after 1 + 3 tries, with the error; 2 keeps serving.
        os.makedirs(tmp_path / "m" / "3")
        (tmp_path / "m" / "3" / "saved_model.pb").write_bytes(b"garbage")
        assert wait_for(lambda: states(server.url).get(3) == "END", 10)
        code, body = get(f"{server.url}/v1/models/m/versions/3")
        assert body["model_version_status"][0]["status"]["error_message"].endswith("saved_model.pb: not a SavedModel "
                                                                                   "(Error parsing message)")
        assert predict(server.url, x=1.0) == (200, {"predictions": [2.0]})
    finally:
        server.stop()


def test_hot_swap_under_20_concurrent_clients_fails_no_request(tiny, tmp_path):
    shutil.copytree(tiny[1], tmp_path / "m" / "1")
    server = repository_server(tmp_path, config(tmp_path), poll_seconds=0.05)
    stop, results = threading.Event(), []

    def client():
        while not stop.is_set():
            results.append(predict(server.url, x=1.0))

    threads = [threading.Thread(target=client) for _ in range(20)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.5)
        shutil.copytree(tiny[2], tmp_path / "m" / ".2.tmp")
        os.rename(tmp_path / "m" / ".2.tmp", tmp_path / "m" / "2")
        assert wait_for(lambda: results and results[-1][1] == {"predictions": [2.0]})
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
        server.stop()
    assert len(results) > 100 and {code for code, _ in results} == {200}
    assert {json.dumps(body) for _, body in results} == {'{"predictions": [1.0]}', '{"predictions": [2.0]}'}


# --- server-side batching (batching_session.cc) -------------------------------------------------

def test_batched_answers_equal_unbatched_answers(small_model, taxi_spec, taxi_rows, tmp_path):
    from serving.batching import Batcher, Parameters
    from serving.json_tensor import instances

    shutil.copytree(small_model[0], tmp_path / "taxi" / "1")
    fn = __import__("tensorflow").saved_model.load(small_model[0]).signatures["serving_default"]
    names = fn.structured_input_signature[1]
    rows = instances({name: [r[name] if taxi_spec.features[name].type == "string" else
                             (float(r[name]) if r[name] else float("nan")) for r in taxi_rows[:64]] for name in names})
    plain = serve(tmp_path)
    batched = serve(tmp_path, batcher=Batcher(Parameters(max_batch_size=32, batch_timeout_micros=5000,
                                                         num_batch_threads=2, allowed_batch_sizes=(8, 16, 32))),
                    num_threads=32)

    try:
        def ask(url, row):
            request = urllib.request.Request(f"{url}/v1/models/taxi:predict", method="POST",
                                             data=json.dumps({"instances": [row]}).encode())
            with urllib.request.urlopen(request, timeout=60) as r:
                return json.loads(r.read())["predictions"][0]

        want = [ask(plain.url, row) for row in rows]
        calls_before, rows_before = batch_stats()
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            got = list(pool.map(lambda row: ask(batched.url, row), rows))
        # Row for row: the same classes; scores equal within 1e-6. Not bit for bit: the kernels sum in
        # an order that depends on the batch size (measured: 1-3 float32 ulp on 1 of 3 values, with
        # and without oneDNN), as in TF Serving, whose batching changes batch sizes the same way.
        assert [g["classes"] for g in got] == [w["classes"] for w in want]
        assert [g["class_ids"] for g in got] == [w["class_ids"] for w in want]
        np.testing.assert_allclose([g["probabilities"] for g in got], [w["probabilities"] for w in want], atol=1e-6)
        # Rows were merged: fewer model calls than requests; padded batches carry at least the rows.
        calls, merged = (after - before for after, before in zip(batch_stats(), (calls_before, rows_before)))
        assert calls < len(rows) and merged >= len(rows), (calls, merged)
        request = urllib.request.Request(f"{batched.url}/v1/models/taxi:predict", method="POST",
                                         data=json.dumps({"instances": rows[:33]}).encode())
        with pytest.raises(urllib.error.HTTPError) as too_big:
            urllib.request.urlopen(request, timeout=60)
        assert too_big.value.code == 400
        assert "Task size 33 is larger than maximum input batch size 32" in json.loads(too_big.value.read())["error"]
    finally:
        plain.stop()
        batched.stop()


def batch_stats():
    """(model calls, rows) the batcher has run for serving_default so far."""
    from serving import metrics

    samples = {s.name: s.value for s in metrics.BATCH_SIZE.collect()[0].samples
               if s.labels.get("signature") == "serving_default" and not s.name.endswith("_bucket")}
    return samples.get(metrics.BATCH_SIZE._name + "_count", 0), samples.get(metrics.BATCH_SIZE._name + "_sum", 0)


def test_batched_predict_waits_on_the_event_loop_not_in_a_worker(tiny, tmp_path):
    """With one REST worker thread, 8 concurrent predict calls still meet in one batch: each
    waits for its batch on the event loop (a worker blocked per request would let one in at a
    time, 8 batches of 1). A call still waiting when --rest_api_timeout_in_ms passes is answered
    504 and its late batch answers nobody; the server goes on answering."""
    from serving.batching import Batcher, Parameters

    shutil.copytree(tiny[2], tmp_path / "m" / "1")
    server = serve(tmp_path, batcher=Batcher(Parameters(max_batch_size=8, batch_timeout_micros=5_000_000,
                                                        num_batch_threads=1)), num_threads=1, timeout_ms=1000)
    try:
        calls_before, rows_before = batch_stats()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda k: predict(server.url, x=float(k)), range(8)))
        assert answers == [(200, {"predictions": [2.0 * k]}) for k in range(8)]
        calls, rows = (after - before for after, before in zip(batch_stats(), (calls_before, rows_before)))
        assert (calls, rows) == (1, 8)
        # Alone, a row waits 5 s for others to join its batch: past the 1 s timeout.
        code, body = predict(server.url, x=1.0)
        assert code == 504 and "--rest_api_timeout_in_ms" in body["error"], body
        request = urllib.request.Request(server.url + "/v1/models/m:predict", method="POST",
                                         data=json.dumps({"instances": [float(k) for k in range(8)]}).encode())
        with urllib.request.urlopen(request, timeout=30) as r:  # a full batch: runs at once
            assert json.loads(r.read()) == {"predictions": [2.0 * k for k in range(8)]}
    finally:
        server.stop()


def test_tensorflow_thread_flags_reach_tensorflow():
    """--tensorflow_intra_op_parallelism / --tensorflow_inter_op_parallelism set TensorFlow's
    pools (they were accepted and ignored before); in a fresh process, as TF fixes them at start."""
    import subprocess
    import sys

    code = ("from serving.server import apply_thread_flags, parser; import tensorflow as tf; "
            "apply_thread_flags(parser().parse_args(['--tensorflow_intra_op_parallelism=3', "
            "'--tensorflow_inter_op_parallelism=2'])); "
            "print(tf.config.threading.get_intra_op_parallelism_threads(), "
            "tf.config.threading.get_inter_op_parallelism_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.join(os.path.dirname(__file__), ".."), check=True).stdout
    assert out.split() == ["3", "2"]


def test_a_version_change_collects_the_unloaded_version_and_freezes_the_loaded_ones(tiny, tmp_path):
    """The server process's Repository hook (serving.server.freeze_loaded_objects) runs after each
    refresh that loads or unloads a version, and only then. A version it froze is still collected
    once unloaded (frozen objects never are: the hook unfreezes first), and no batch queue keeps
    it alive after its last batch."""
    import gc
    import weakref

    from serving.batching import Batcher, Parameters
    from serving.core import Servables
    from serving.repository import Repository
    from serving.server import freeze_loaded_objects

    changes = []

    def hook():
        freeze_loaded_objects()
        changes.append(gc.get_freeze_count())

    shutil.copytree(tiny[1], tmp_path / "m" / "1")
    (tmp_path / "models.config").write_text(config(tmp_path))  # latest 1: a new version replaces the old
    try:
        repo = Repository(config_file=str(tmp_path / "models.config"), on_change=hook)
        assert len(changes) == 1 and changes[0] > 0 and sorted(repo.snapshot("m").versions) == [1]
        repo.refresh()
        assert len(changes) == 1  # nothing loaded or unloaded: no collection
        servables = Servables(repo, Batcher(Parameters(num_batch_threads=1)))
        first = repo.resolve("m")
        assert servables.run(first, "serving_default", {"x": np.array([3.0], np.float32)})["y"].tolist() == [3.0]
        module = weakref.ref(first.module)

        class Cyclic:  # what a loaded model is full of: objects that only the cycle collector frees
            pass
        first.cycle = Cyclic()
        first.cycle.loop = first.cycle
        cycle = weakref.ref(first.cycle)
        freeze_loaded_objects()  # now frozen with the version that holds it
        del first
        shutil.copytree(tiny[2], tmp_path / "m" / "2")
        repo.refresh()
        assert len(changes) == 2 and sorted(repo.snapshot("m").versions) == [2]
        assert module() is None, "something still holds the unloaded version"
        assert cycle() is None, "the unloaded version's frozen cycles outlived the collection"
    finally:
        gc.unfreeze()


def test_batching_parameters_file_is_tf_servings_text_proto(tmp_path):
    from serving.batching import read_parameters

    p = read_parameters(os.path.join(os.path.dirname(__file__), "..", "serving", "config", "batching.config"))
    assert (p.max_batch_size, p.batch_timeout, p.num_batch_threads, p.max_enqueued_batches) == (1024, 0.0, 4, 4)
    bad = tmp_path / "b.config"
    bad.write_text("max_batch_size { value: 64 } allowed_batch_sizes: 8 allowed_batch_sizes: 32")
    with pytest.raises(SystemExit, match="Last entry in allowed_batch_sizes must match max_batch_size; last entry "
                                         "was 32; expected 64"):
        read_parameters(str(bad))


# --- slow and hostile clients -------------------------------------------------------------------

def test_slow_headers_are_cut_and_idle_connections_hold_no_thread(tiny, tmp_path):
    shutil.copytree(tiny[1], tmp_path / "m" / "1")
    server = repository_server(tmp_path, config(tmp_path), {"idle_timeout": 1.0, "max_connections": 300},
                               poll_seconds=3600)
    try:
        threads_before = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", server.rest_port)) for _ in range(250)]
        for s in idle[:50]:
            s.sendall(b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        time.sleep(0.3)
        assert threading.active_count() - threads_before < 10  # connections wait on the event loop
        assert predict(server.url, x=1.0) == (200, {"predictions": [1.0]})
        time.sleep(1.5)
        closed = 0
        for s in idle:
            s.settimeout(2)
            try:
                closed += s.recv(1) == b""
            except (socket.timeout, ConnectionResetError):
                closed += 1
            s.close()
        assert closed == 250  # the header / idle timeout ended every one
    finally:
        server.stop()


def test_connections_over_the_cap_are_closed_at_once(tiny, tmp_path):
    shutil.copytree(tiny[1], tmp_path / "m" / "1")
    server = repository_server(tmp_path, config(tmp_path), {"max_connections": 5}, poll_seconds=3600)
    try:
        held = [socket.create_connection(("127.0.0.1", server.rest_port)) for _ in range(5)]
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", server.rest_port))
        extra.settimeout(5)
        try:
            extra.sendall(b"GET /v1/models/m HTTP/1.1\r\nHost: x\r\n\r\n")
            assert extra.recv(100) == b""  # closed, not queued
        except ConnectionResetError:
            pass  # closed before the request arrived: also not queued
        for s in held:
            s.close()
        time.sleep(0.2)
        assert predict(server.url, x=1.0) == (200, {"predictions": [1.0]})
    finally:
        server.stop()


def test_a_request_over_the_rest_timeout_is_a_504(small_model, tmp_path, taxi_spec):
    from serving.json_tensor import instances

    shutil.copytree(small_model[0], tmp_path / "taxi" / "1")
    server = serve(tmp_path, timeout_ms=1)
    try:
        names = server.servables.repository.resolve("taxi").signatures["serving_default"].structured_input_signature[1]
        row = {n: ("Cash" if taxi_spec.features[n].type == "string" else 1.0) for n in names}
        request = urllib.request.Request(f"{server.url}/v1/models/taxi:predict", method="POST",
                                         data=json.dumps({"instances": instances({n: [row[n]] * 5000
                                                                                  for n in names})}).encode())
        with pytest.raises(urllib.error.HTTPError) as timed_out:
            urllib.request.urlopen(request, timeout=60)
        assert timed_out.value.code == 504  # DEADLINE_EXCEEDED (http_server.cc:58)
        assert "rest_api_timeout_in_ms" in json.loads(timed_out.value.read())["error"]
    finally:
        server.stop()


def test_metrics_use_tf_serving_names_and_urls_add_no_series(tiny, tmp_path):
    shutil.copytree(tiny[1], tmp_path / "m" / "1")
    server = repository_server(tmp_path, config(tmp_path), poll_seconds=3600)
    try:
        predict(server.url, x=1.0)
        for i in range(50):
            predict(server.url, f"/v1/models/random{i}:predict")
        with urllib.request.urlopen(f"{server.url}/monitoring/prometheus/metrics", timeout=30) as r:
            page = r.read().decode()
        assert ':tensorflow:serving:request_count_total{model_name="m",status="OK"}' in page
        assert "random" not in page  # an unknown model name is not a label value
    finally:
        server.stop()


def tiny_regressor(path) -> str:
    """A SavedModel with TF Serving's regress signature: `inputs` (serialized tf.Example with a
    float feature x) -> `outputs` = 2x + 1; method name set as components/export.py sets it."""
    import tensorflow as tf

    from components.export import set_method_names

    class Regressor(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def regress(self, inputs):
            x = tf.io.parse_example(inputs, {"x": tf.io.FixedLenFeature([], tf.float32, default_value=0.0)})["x"]
            return {"outputs": 2.0 * x + 1.0}

    module = Regressor()
    tf.saved_model.save(module, str(path), signatures={"regression": module.regress})
    set_method_names(str(path))
    return str(path)


def test_regress_over_rest_and_grpc_with_the_method_name_check_on(tmp_path):
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc, regression_pb2

    from serving.core import Servables
    from serving.repository import Repository
    from serving.server import LocalServer

    tiny_regressor(tmp_path / "r" / "1")
    repo = Repository.single("r", str(tmp_path / "r"), poll_seconds=3600)
    server = LocalServer(Servables(repo, method_name_check=True), rest_port=0, grpc_port=0).start()
    try:
        body = json.dumps({"signature_name": "regression", "examples": [{"x": 1.5}, {"x": -2.0}]}).encode()
        request = urllib.request.Request(f"{server.url}/v1/models/r:regress", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=30) as r:
            assert json.loads(r.read()) == {"results": [4.0, -3.0]}  # J:1103-1127
        # regressor.cc:154-161: with --enable_signature_method_name_check a regress signature is
        # refused for :classify by its method name.
        request = urllib.request.Request(f"{server.url}/v1/models/r:classify", data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert json.loads(refused.value.read())["error"] == (
            "Expected classification signature method_name to be tensorflow/serving/classify. "
            "Was: tensorflow/serving/regress")
        stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
        req = regression_pb2.RegressionRequest()
        req.model_spec.name, req.model_spec.signature_name = "r", "regression"
        for x in (1.5, -2.0):
            req.input.example_list.examples.add().features.feature["x"].float_list.value.append(x)
        answer = stub.Regress(req, timeout=30)
        assert [r.value for r in answer.result.regressions] == [4.0, -3.0] and answer.model_spec.version.value == 1
    finally:
        server.stop()


def test_work_whose_client_left_before_a_worker_took_it_is_dropped():
    """The proxy closes its backend connection at its deadline (aiohttp cancels the call); the
    server then skips the queued request instead of computing an answer nobody reads, so one slow
    call does not make the next one time out too."""
    import socket

    from serving.http import HttpServer, Response

    calls = []

    def handler(request):
        calls.append(request.target)
        time.sleep(0.5)
        return Response(200, b"{}")

    server = HttpServer(handler, num_threads=1).start()
    try:
        first = socket.create_connection(("127.0.0.1", server.port))
        first.sendall(b"POST /first HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        time.sleep(0.1)  # the only worker is busy with /first
        second = socket.create_connection(("127.0.0.1", server.port))
        second.sendall(b"POST /second HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        time.sleep(0.1)
        second.close()  # the caller gives up while /second waits for a worker
        assert first.recv(1024).startswith(b"HTTP/1.1 200")
        first.close()
        time.sleep(0.7)
        assert calls == ["/first"] and server.dropped == 1
    finally:
        server.stop()


def test_request_tensors_are_tf_constants_in_host_memory():
    """serving/core.py's _tensor (made with no device, past tf.constant's wrappers) gives the
    tensor tf.constant gives for each input dtype a signature takes: same dtype, shape and values,
    in host (CPU) memory, as a TF Serving session's feeds are."""
    import tensorflow as tf

    from serving.core import _tensor

    strings = np.empty(2, dtype=object)
    strings[:] = [b"Credit Card", "".encode()]
    for value, dtype in ((np.array([1.5, np.nan], np.float32), tf.float32), (np.array([[3], [-4]], np.int64), tf.int64),
                         (np.array([0.25], np.float64), tf.float64), (strings, tf.string)):
        made, want = _tensor(value, dtype), tf.constant(value, dtype)
        assert (made.dtype, made.shape.as_list()) == (want.dtype, want.shape.as_list())
        assert made.device.endswith("CPU:0"), made.device
        np.testing.assert_array_equal(made.numpy(), want.numpy())


def test_grpc_inputs_read_as_tf_make_ndarray_reads_them():
    """serving/grpc_server.py's quick TensorProto reader against TensorFlow's own, on what clients
    send: listed values of each common dtype, several shapes, packed tensor_content, one value
    repeated to fill a shape, and a dtype the quick path leaves to make_ndarray."""
    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2

    from serving.grpc_server import _ndarray

    repeated = tensor_pb2.TensorProto(dtype=tf.float32.as_datatype_enum, float_val=[2.5])
    repeated.tensor_shape.dim.add(size=3)
    protos = [tf.make_tensor_proto([1.5, float("nan"), -0.0], dtype=tf.float32),
              tf.make_tensor_proto([[1e300, -2.0]], dtype=tf.float64),
              tf.make_tensor_proto([2 ** 62, -(2 ** 63)], dtype=tf.int64),
              tf.make_tensor_proto([[1, 2, 3], [4, 5, 6]], dtype=tf.int32),
              tf.make_tensor_proto([True, False], dtype=tf.bool),
              tf.make_tensor_proto([b"Cash", b"\xff\xfe", "Crédit".encode()], dtype=tf.string),
              tf.make_tensor_proto(np.zeros((0, 3), np.float32)),
              tf.make_tensor_proto(np.arange(6, dtype=np.float32).reshape(2, 3)),  # tensor_content
              tf.make_tensor_proto(7.0, dtype=tf.float32),  # a scalar
              tf.make_tensor_proto([1.0, 2.0], dtype=tf.float16), repeated,
              tf.make_tensor_proto([12.5], dtype=tf.float32),  # one row's column, as bench-serving's client sends
              tf.make_tensor_proto(["Credit Card"], dtype=tf.string), tf.make_tensor_proto(np.zeros(0, np.int64))]
    for proto in protos:
        want, got = tf.make_ndarray(proto), _ndarray(proto)
        assert got.dtype == want.dtype and got.shape == want.shape, proto
        if want.dtype == object:
            assert got.tolist() == want.tolist()
        else:
            np.testing.assert_array_equal(got, want)


def test_grpc_outputs_list_their_values_in_the_typed_field_as_tf_serving_writes_them():
    """TF Serving answers Predict with Tensor::AsProtoField (tensorflow_serving/servables/tensorflow/
    predict_util.cc, PostProcessPredictionResult's kAsProtoField case and RunPredict, which passes
    it): the values listed in float_val / double_val / int_val / int64_val / bool_val / string_val,
    never tensor_content, for every shape, a batch's slices among them. tf.make_ndarray reads the
    same array back; dtypes outside those six are left to tf.make_tensor_proto."""
    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2

    from serving.grpc_server import _write_tensor

    fields = {np.float32: "float_val", np.float64: "double_val", np.int32: "int_val", np.int64: "int64_val",
              np.bool_: "bool_val", np.object_: "string_val"}
    batch = np.arange(12, dtype=np.float32).reshape(6, 2)
    arrays = [np.float32(1.5).reshape(()), np.array([0.1], np.float32), np.array([np.nan], np.float32),
              np.array([[0.1, 0.9]], np.float32), np.array([1e300, np.nan, -0.0]), np.array([7], np.int32),
              np.array([[1, 2]], np.int32), np.array([-1, 2 ** 63 - 1]), np.array([True, False]), np.array([[True]]),
              np.array([b"1", b"\xff"], dtype=object), np.array([[b"Cash"]], dtype=object),
              np.zeros((0, 3), np.float32), np.array([], dtype=object), batch[2:3], batch[2:5], batch[:, 1]]
    for array in arrays:
        got = tensor_pb2.TensorProto()
        _write_tensor(array, got)
        reference = tf.make_tensor_proto(array)
        assert got.dtype == reference.dtype and got.tensor_shape == reference.tensor_shape, array
        assert got.tensor_content == b"", array
        listed = list(getattr(got, fields[array.dtype.type]))
        assert len(listed) == array.size, array
        np.testing.assert_array_equal(np.array(listed, dtype=array.dtype), array.ravel())
        np.testing.assert_array_equal(tf.make_ndarray(got), array)
    for array in (np.array([1.0, 2.0], np.float16), np.array(["str"], dtype=object), np.array([1, 2], np.uint8)):
        got = tensor_pb2.TensorProto()
        _write_tensor(array, got)
        assert got.SerializeToString() == tf.make_tensor_proto(array).SerializeToString(), array


def test_an_idle_server_answers_small_requests_on_its_event_loop():
    """serving/http.py: alone on the server, a small request skips the hop to a worker; a large
    body, a second request in flight, or a server without the option goes to the workers."""
    from serving.http import INLINE_BODY_BYTES, HttpServer, Response

    seen, release = [], threading.Event()

    def handler(request):
        seen.append((request.target, threading.current_thread().name))
        if request.target == "/hold":
            release.wait(10)
        return Response(200, b"{}")

    def post(port, target, body=b"{}"):
        req = urllib.request.Request(f"http://127.0.0.1:{port}{target}", data=body, method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status

    inline = HttpServer(handler, num_threads=2, inline_when_idle=True, name="inl").start()
    plain = HttpServer(handler, num_threads=2, name="wrk").start()
    try:
        assert post(inline.port, "/small") == 200 and post(inline.port, "/big", b"x" * (INLINE_BODY_BYTES + 1)) == 200
        # /hold (a large body: a worker's) is still being answered when /beside arrives
        held = threading.Thread(target=post, args=(inline.port, "/hold", b"x" * (INLINE_BODY_BYTES + 1)))
        held.start()
        deadline = time.monotonic() + 10
        while not any(t == "/hold" for t, _ in seen) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert post(inline.port, "/beside") == 200
        release.set()
        held.join(10)
        assert post(plain.port, "/plain") == 200
    finally:
        release.set()
        inline.stop()
        plain.stop()
    threads = dict(seen)
    assert threads["/small"] == "inl-ioloop" and threads["/plain"].startswith("wrk_")
    assert threads["/big"].startswith("inl_") and threads["/beside"].startswith("inl_")


def batch_size_model(path) -> str:
    """A SavedModel whose serving_default answers, for each row of x, y = x and n = the number of
    rows the model was called with: the batch size the batcher really ran."""
    import tensorflow as tf

    class Counts(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
        def serve(self, x):
            return {"y": x, "n": tf.fill(tf.shape(x), tf.size(x))}

    module = Counts()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return str(path)


def test_allowed_batch_sizes_pad_a_batch_to_the_next_allowed_size(tmp_path):
    """batching_session.cc:494-504 and :545-565 (RoundToLowestAllowedBatchSize, padding rows) and
    :605-612 (the padding split off the outputs): a batch of 3 rows runs as
    4 with allowed_batch_sizes 2, 4, 8, one of 5 as 8; the padding rows are cut from the answer."""
    from serving.batching import Batcher, Parameters

    batch_size_model(tmp_path / "m" / "1")
    server = serve(tmp_path, batcher=Batcher(Parameters(max_batch_size=8, batch_timeout_micros=0,
                                                        num_batch_threads=1, allowed_batch_sizes=(2, 4, 8))))
    try:
        for rows, runs_as in ((1, 2), (2, 2), (3, 4), (5, 8), (8, 8)):
            request = urllib.request.Request(server.url + "/v1/models/m:predict", method="POST",
                                             data=json.dumps({"instances": [float(k) for k in range(rows)]}).encode())
            with urllib.request.urlopen(request, timeout=30) as r:
                answer = json.loads(r.read())["predictions"]
            assert answer == [{"y": float(k), "n": runs_as} for k in range(rows)], (rows, answer)
    finally:
        server.stop()


def test_a_full_batch_queue_refuses_a_task_with_tf_servings_503(tmp_path):
    """shared_batch_scheduler.h (tensorflow/core/kernels/batching_util, Queue::Schedule): a task
    that does not fit the open batch needs a new one; with max_enqueued_batches batches already
    queued (the open one counts) it is refused, UNAVAILABLE "The batch scheduling queue to which
    this task was submitted is full"; http_server.cc:78-79 maps UNAVAILABLE to 503. The task that
    was queued is answered once its batch times out."""
    from serving.batching import Batcher, Parameters

    batch_size_model(tmp_path / "m" / "1")
    server = serve(tmp_path, batcher=Batcher(Parameters(max_batch_size=2, batch_timeout_micros=2_000_000,
                                                        max_enqueued_batches=1, num_batch_threads=1)))
    try:
        def two_rows():
            request = urllib.request.Request(server.url + "/v1/models/m:predict", method="POST",
                                             data=json.dumps({"instances": [1.0, 2.0]}).encode())
            try:
                with urllib.request.urlopen(request, timeout=30) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            for _ in range(5):  # again if the one row came while a two-row batch was still queued (refused too)
                first = pool.submit(predict, server.url, x=1.0)  # one row: its batch waits 2 s for a second row
                deadline = time.monotonic() + 1.5
                while True:  # two rows fill a batch of their own: served at once until the one row is queued
                    code, answer = two_rows()
                    if code != 200 or first.done() or time.monotonic() > deadline:
                        break
                    assert answer == {"predictions": [{"y": 1.0, "n": 2}, {"y": 2.0, "n": 2}]}
                if first.result(timeout=30)[0] == 200:
                    break
            assert code == 503, answer
            assert answer["error"].startswith("The batch scheduling queue to which this task was submitted is full")
            assert first.result() == (200, {"predictions": [{"y": 1.0, "n": 1}]})  # its batch timed out alone
    finally:
        server.stop()
