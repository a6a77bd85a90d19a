"""The local TF-Serving-compatible server over a real exported model."""

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def server(small_model, tmp_path_factory):
    from serving.repository import Repository
    from serving.server import make_server

    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(small_model[0], root / "taxi" / "1")
    repo = Repository(str(root), poll_seconds=3600)
    httpd = make_server(repo, port=0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", repo, root
    httpd.shutdown()


def call(url, body=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _instances(rows, spec):
    """REST rows as a client sends them: a missing value is simply left out."""
    out = []
    for r in rows:
        row = {}
        for name, f in spec.features.items():
            if r[name] != "":
                row[name] = r[name] if f.type == "string" else float(r[name])
        out.append(row)
    return out


def test_status_and_metadata(server):
    url, _, _ = server
    assert call(f"{url}/v1/models/taxi") == (200, {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]})
    code, meta = call(f"{url}/v1/models/taxi/versions/1/metadata")
    assert code == 200 and "serving_default" in meta["metadata"]["signature_def"]["signature_def"]


def test_rest_predictions_equal_the_in_process_signature(server, small_model, taxi_spec, taxi_rows):
    import tensorflow as tf

    url, _, _ = server
    rows = taxi_rows[1500:1700]
    code, body = call(f"{url}/v1/models/taxi:predict", {"instances": _instances(rows, taxi_spec)})
    assert code == 200 and len(body["predictions"]) == len(rows)
    rest = np.array([p["probabilities"] for p in body["predictions"]])
    inputs = {}
    for name, f in taxi_spec.features.items():
        if f.type == "string":
            inputs[name] = tf.constant([r[name] for r in rows])
        else:
            dtype = tf.float32 if f.type == "float" else tf.float64
            inputs[name] = tf.constant([float(r[name]) if r[name] else math.nan for r in rows], dtype)
    local = tf.saved_model.load(small_model[0]).signatures["serving_default"](**inputs)
    np.testing.assert_allclose(rest, local["probabilities"].numpy(), atol=1e-6)
    # Columnar `inputs` gives the same numbers.
    columns = {name: [row.get(name, "" if f.type == "string" else None) for row in _instances(rows[:5], taxi_spec)]
               for name, f in taxi_spec.features.items() if f.type == "string"}
    columns.update({name: [float(r[name]) for r in rows[:5]] for name in ("fare", "trip_start_hour")})
    code, col = call(f"{url}/v1/models/taxi:predict", {"inputs": columns})
    assert code == 200 and len(col["outputs"]["probabilities"]) == 5


def test_classify_over_the_tf_example_signature(server):
    url, _, _ = server
    code, body = call(f"{url}/v1/models/taxi:classify",
                      {"context": {"payment_type": "Credit Card"}, "examples": [{"fare": 12.5}, {"fare": 60.0}]})
    assert code == 200 and len(body["results"]) == 2
    for result in body["results"]:
        assert [c for c, _ in result] == ["no", "yes"] and abs(sum(s for _, s in result) - 1.0) < 1e-5


@pytest.mark.parametrize("path,body,raw,code,needle", [
    ("taxi:predict", None, b"{not json", 400, "malformed JSON"),
    ("taxi:predict", {"instances": [{"fare": 1.0, "tip_jar": 3}]}, None, 400, "unknown feature 'tip_jar'"),
    ("taxi:predict", {"instances": [{"fare": 1.0}]}, None, 400, "missing required feature 'payment_type'"),
    ("taxi:predict", {"instances": [{"fare": "cheap", "payment_type": "Cash"}]}, None, 400,
     "feature 'fare': expected a number"),
    ("taxi:predict", {"instances": [{"payment_type": 3}]}, None, 400, "feature 'payment_type': expected a string"),
    ("taxi:predict", None, b'{"instances": [{"fare": NaN}]}', 400, "NaN is not allowed"),
    ("taxi:predict", {"instances": [{}], "inputs": {}}, None, 400, "exactly one of"),
    ("taxi:predict", {"instances": []}, None, 400, "non-empty list"),
    ("taxi:predict", {"instances": [{}], "signature_name": "nope"}, None, 400, "'nope' not found"),
    ("nope:predict", {"instances": [{}]}, None, 404, "Latest(nope)"),
    ("taxi/versions/7:predict", {"instances": [{}]}, None, 404, "Specific(taxi, 7)"),
    ("taxi/labels/gold:predict", {"instances": [{}]}, None, 404, "label: gold"),
    ("taxi/versions/x:predict", {"instances": [{}]}, None, 400, "positive integer"),
])
def test_bad_requests_get_a_4xx_naming_the_problem(server, path, body, raw, code, needle):
    url, _, _ = server
    got, answer = call(f"{url}/v1/models/{path}", body, raw)
    assert got == code and needle in answer["error"], answer
    assert call(f"{url}/v1/models/taxi:predict", {"instances": [{"fare": 5.0, "payment_type": "Cash"}]})[0] == 200  # still serving


def test_oversized_body_is_refused_unread(server):
    import http.client

    from serving.server import MAX_BODY_BYTES

    url, _, _ = server
    conn = http.client.HTTPConnection(url.split("//")[1], timeout=30)
    conn.putrequest("POST", "/v1/models/taxi:predict")
    conn.putheader("Content-Length", str(MAX_BODY_BYTES + 1))
    conn.endheaders()  # the body never comes: the server answers from the header alone
    response = conn.getresponse()
    assert response.status == 413 and "too large" in json.loads(response.read())["error"]
    conn.close()
    assert call(f"{url}/v1/models/taxi:predict", {"instances": [{"fare": 5.0, "payment_type": "Cash"}]})[0] == 200


def test_new_version_and_label_are_picked_up(server, small_model):
    url, repo, root = server
    shutil.copytree(small_model[0], root / "taxi" / "2")
    (root / "taxi" / "labels.json").write_text(json.dumps({"stable": 1, "canary": 2, "ghost": 9}))
    repo.refresh()
    assert [s["version"] for s in call(f"{url}/v1/models/taxi")[1]["model_version_status"]] == ["2", "1"]
    assert call(f"{url}/v1/models/taxi/labels/stable")[1]["model_version_status"][0]["version"] == "1"
    assert call(f"{url}/v1/models/taxi/labels/canary:predict", {"instances": [{"fare": 5.0, "payment_type": "Cash"}]})[0] == 200
    assert call(f"{url}/v1/models/taxi/labels/ghost")[0] == 404  # a label may only name a loaded version


def test_prometheus_metrics_use_tf_serving_names(server):
    url, _, _ = server
    call(f"{url}/v1/models/taxi:predict", {"instances": [{"fare": 5.0, "payment_type": "Cash"}]})
    with urllib.request.urlopen(f"{url}/monitoring/prometheus/metrics") as r:
        text = r.read().decode()
    assert ':tensorflow:serving:request_count_total{model_name="taxi",status="OK"}' in text
    assert ":tensorflow:serving:request_latency_bucket" in text


def test_import_contract_is_kept_and_catches_a_violation(tmp_path):
    lint = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    ok = subprocess.run([lint, "--config", os.path.join(REPO, ".importlinter")], cwd=REPO,
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "2 kept, 0 broken" in ok.stdout, ok.stdout + ok.stderr
    for package in ("serving", "components", "pipelines"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "serving" / "leak.py").write_text("from components import preprocessing\n")
    (tmp_path / "serving" / "predlog.py").write_text("import json\n")
    (tmp_path / "serving" / "proxy.py").write_text("from serving import server\n")  # server needs TensorFlow
    (tmp_path / "serving" / "server.py").write_text("import tensorflow\n")
    (tmp_path / "components" / "preprocessing.py").write_text("")
    bad = subprocess.run([lint, "--config", os.path.join(REPO, ".importlinter")], cwd=tmp_path,
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert bad.returncode != 0 and "serving.leak -> components.preprocessing" in bad.stdout, bad.stdout
    assert "serving.proxy -> serving.server" in bad.stdout and "0 kept, 2 broken" in bad.stdout, bad.stdout


# --- robustness: fuzzing and a hot swap under load ---------------------------------------

def _json_values():
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                        st.text(max_size=12))
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=12)


FUZZ_COUNTS = {"requests": 0, "4xx": 0, "5xx": 0, "200": 0}


def test_fuzzed_bad_requests_never_get_a_5xx(server, taxi_spec):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    url, _, _ = server
    features = sorted(taxi_spec.features) + ["tip_jar", ""]
    row = st.dictionaries(st.sampled_from(features), _json_values(), max_size=5)
    body = st.one_of(
        st.fixed_dictionaries({"instances": st.one_of(st.lists(row, max_size=3), _json_values())},
                              optional={"signature_name": st.one_of(st.text(max_size=20), _json_values()),
                                        "inputs": _json_values()}),
        st.fixed_dictionaries({"inputs": st.one_of(st.dictionaries(st.sampled_from(features), _json_values()),
                                                   _json_values())}),
        st.fixed_dictionaries({"examples": st.one_of(st.lists(row, max_size=3), _json_values())},
                              optional={"context": _json_values()}),
        _json_values())
    path = st.sampled_from(["taxi:predict", "taxi:classify", "taxi:regress", "taxi/versions/1:predict",
                            "taxi/labels/stable:classify", "taxi/versions/0:predict", "nope:predict",
                            "taxi/versions/-1:predict", "taxi:explode"])
    raw = st.one_of(st.binary(max_size=64), body.map(lambda b: json.dumps(b).encode()))

    @settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(path=path, data=raw)
    def fuzz(path, data):
        code, answer = call(f"{url}/v1/models/{path}", raw=data)
        FUZZ_COUNTS["requests"] += 1
        FUZZ_COUNTS["5xx" if code >= 500 else "4xx" if code >= 400 else "200"] += 1
        assert code < 500, (path, data, answer)
        if code >= 400:
            assert answer["error"]

    fuzz()
    assert FUZZ_COUNTS["requests"] >= 1000 and FUZZ_COUNTS["4xx"] >= 900 and FUZZ_COUNTS["5xx"] == 0, FUZZ_COUNTS
    print("fuzz:", FUZZ_COUNTS)


def test_hot_swap_under_20_concurrent_clients_fails_no_request(server, small_model):
    import concurrent.futures
    import time

    url, repo, root = server
    (root / "taxi" / "labels.json").write_text(json.dumps({"stable": 1}))
    repo.refresh()
    stop = threading.Event()
    body = {"instances": [{"fare": 7.5, "payment_type": "Cash"}]}

    def client():
        codes = []
        while not stop.is_set():
            codes.append(call(f"{url}/v1/models/taxi/labels/stable:predict", body)[0])
            codes.append(call(f"{url}/v1/models/taxi:predict", body)[0])
        return codes

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(client) for _ in range(20)]
        time.sleep(1.0)
        shutil.copytree(small_model[0], root / "taxi" / "3")  # newest: version 1 leaves the policy
        (root / "taxi" / "labels.json").write_text(json.dumps({"stable": 3}))
        repo.refresh()  # load 3, move the label, drop 1: what the poll thread does
        time.sleep(1.0)
        stop.set()
        codes = [c for f in futures for c in f.result()]
    assert len(codes) > 100 and set(codes) == {200}, {c: codes.count(c) for c in set(codes)}
    assert call(f"{url}/v1/models/taxi/labels/stable")[1]["model_version_status"][0]["version"] == "3"


def test_a_version_that_fails_to_load_is_reported_and_the_others_keep_serving(small_model, tmp_path):
    from serving.repository import Repository
    from serving.server import make_server

    shutil.copytree(small_model[0], tmp_path / "taxi" / "1")
    shutil.copytree(small_model[0], tmp_path / "taxi" / "2")
    (tmp_path / "taxi" / "2" / "saved_model.pb").write_bytes(b"truncated upload")
    repo = Repository(str(tmp_path), poll_seconds=3600)
    httpd = make_server(repo, port=0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1/models/taxi"
    try:
        code, body = call(url)
        assert code == 200
        states = {s["version"]: s for s in body["model_version_status"]}
        assert states["1"]["state"] == "AVAILABLE"
        assert states["2"]["state"] == "END" and "saved_model.pb" in states["2"]["status"]["error_message"]
        assert call(f"{url}/versions/2")[1]["model_version_status"][0]["state"] == "END"
        code, body = call(f"{url}/versions/2:predict", {"instances": [{"payment_type": "Cash"}]})
        assert code == 404 and "Specific(taxi, 2)" in body["error"]
        code, body = call(f"{url}:predict", {"instances": [{"payment_type": "Cash"}]})  # latest loaded: 1
        assert code == 200 and len(body["predictions"]) == 1
        repo.refresh()  # not retried: the failure stays reported, nothing is reloaded
        assert repo.snapshot("taxi").failed.keys() == {2}
    finally:
        httpd.shutdown()
