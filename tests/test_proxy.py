"""The proxy: A/B split and shadow, parameter-based control, prediction log, faults.

Most tests put a stand-in TF Serving behind the proxy (answers derived from the request, so a
test can tell which variant and version answered); the last one uses the real local server.
"""

import json
import math
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import REPO

VERSIONS = {"stable": 1, "canary": 2}
OFFSET = {1: 0.0, 2: 0.5, 3: 0.25}  # the fake's score depends on the version that computes it


class FakeServing:
    """Answers :predict with score = fare / 100 (+ 0.5 for version 2), like TF Serving's REST API."""

    def __init__(self, port=0, delay=0.0):
        self.paths, self.delay = [], delay
        self.cookie, self.cookies = None, []  # a Set-Cookie to send; the Cookie header of each POST
        self.raw_answer = None  # bytes every :predict is answered with, when set
        self.labels, self.loaded = dict(VERSIONS), {1, 2}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            wbufsize = -1  # headers and body leave in one write (no Nagle/delayed-ACK stall)

            def log_message(self, *args):
                pass

            def _reply(self, code, body):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if fake.cookie:
                    self.send_header("Set-Cookie", fake.cookie)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.endswith("/metadata"):  # TF Serving's metadata resolves a label to its version
                    version = fake.version_of(self.path[:-len("/metadata")])
                    if version is None and "/labels/" in self.path:  # server_core.cc:873-892
                        return self._reply(400, {"error": "Unrecognized servable version label"})
                    if version is None:
                        return self._reply(404, {"error": "Servable not found"})
                    return self._reply(200, {"model_spec": {"name": "taxi", "version": str(version)},
                                             "metadata": {"signature_def": {"signature_def": {}}}})
                if self.path.startswith("/v1/models/taxi/labels/"):
                    version = fake.labels.get(self.path.rsplit("/", 1)[1])
                    if version is None:
                        return self._reply(404, {"error": "Unrecognized servable version label"})
                    return self._reply(200, {"model_version_status": [{"version": str(version), "state": "AVAILABLE"}]})
                if self.path == "/v1/models/taxi":
                    return self._reply(200, {"model_version_status": [{"version": str(v), "state": "AVAILABLE"}
                                                                      for v in sorted(fake.loaded, reverse=True)]})
                self._reply(200, {"ok": True})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.paths.append(self.path)
                fake.cookies.append(self.headers.get("Cookie"))
                if fake.delay:
                    time.sleep(fake.delay)
                version = fake.version_of(self.path.rsplit(":", 1)[0])
                if version is None:
                    return self._reply(404, {"error": "Servable not found for request"})
                if "instances" not in body:
                    return self._reply(400, {"error": "Missing 'instances' key"})
                if fake.raw_answer is not None:
                    return self._reply(200, fake.raw_answer)
                predictions = []
                for row in body["instances"]:
                    score = min(1.0, row.get("fare", 0) / 100 + OFFSET.get(version, 0))
                    predictions.append({"score": score, "probabilities": [1 - score, score],
                                        "class_ids": int(score > 0.5), "classes": "yes" if score > 0.5 else "no"})
                self._reply(200, {"predictions": predictions})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def version_of(self, model_path):
        """/v1/models/taxi[/labels/l|/versions/n] -> the version it names now (None: not served)."""
        if not (model_path == "/v1/models/taxi" or model_path.startswith("/v1/models/taxi/")):
            return None
        if "/versions/" in model_path:
            version = int(model_path.rsplit("/", 1)[1])
            return version if version in self.loaded else None
        if "/labels/" in model_path:
            return self.labels.get(model_path.rsplit("/", 1)[1])
        return max(self.loaded)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def backend():
    fake = FakeServing()
    yield fake
    fake.close()


def start_proxy(env, log_path=None, env_file=None):
    from serving.proxy import Proxy, make_server

    proxy = Proxy(env=env, env_file=env_file, log_path=log_path, watch_seconds=0)
    server = make_server(proxy, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"

    def stop():
        server.shutdown()
        server.server_close()
        return proxy.close()
    return proxy, url, stop


def post(url, body, headers=None, path="/v1/models/taxi:predict", raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def ab_env(backend, **extra):
    return {"PROXY_BACKEND": backend.url,
            "PROXY_VARIANTS": json.dumps({"stable": {"label": "stable", "weight": 70},
                                          "canary": {"label": "canary", "weight": 30}}), **extra}


def rows(db_path):
    with sqlite3.connect(db_path) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM predictions ORDER BY ts")]


def test_split_follows_the_weights_is_sticky_and_says_who_answered(backend):
    _, url, stop = start_proxy(ab_env(backend))
    try:
        seen = {}
        for user in range(1000):
            code, body, headers = post(url, {"instances": [{"fare": 10.0}]}, {"X-User-Id": f"user-{user}"})
            assert code == 200
            variant = headers["X-Skewless-Variant"]
            assert body["skewless"]["variant"] == variant
            assert body["skewless"]["model_version"] == VERSIONS[variant] == int(headers["X-Skewless-Model-Version"])
            # The backend's answer is the variant's: version 2 adds 0.5 to the score.
            assert body["predictions"][0]["score"] == pytest.approx(0.1 + (0.5 if variant == "canary" else 0))
            seen[user] = variant
        share = sum(v == "canary" for v in seen.values()) / len(seen)
        assert 0.26 < share < 0.34  # 30 % by weight; binomial sd over 1000 users is 1.4 %
        for user in range(0, 1000, 50):  # the same user always lands on the same variant
            assert post(url, {"instances": [{"fare": 1.0}]}, {"X-User-Id": f"user-{user}"})[2][
                "X-Skewless-Variant"] == seen[user]
        paths = {p for p in backend.paths}
        # Each label was resolved to its version and that version called by its explicit URL.
        assert paths == {"/v1/models/taxi/versions/1:predict", "/v1/models/taxi/versions/2:predict"}
        # A client may not choose what answers unless PROXY_ALLOW_CLIENT_ROUTING says so.
        code, body, _ = post(url, {"instances": [{"fare": 1.0}]}, path="/v1/models/taxi/versions/1:predict")
        assert code == 403 and "PROXY_ALLOW_CLIENT_ROUTING" in body["error"]
        code, body, _ = post(url, {"instances": [{"fare": 1.0}]}, {"X-Skewless-Variant": "canary"})
        assert code == 403 and "X-Skewless-Variant" in body["error"]
    finally:
        stop()
    _, url, stop = start_proxy(ab_env(backend, PROXY_ALLOW_CLIENT_ROUTING="true"))
    try:  # allowed: a URL that names a version or label bypasses the split, as does the header
        code, body, headers = post(url, {"instances": [{"fare": 1.0}]}, path="/v1/models/taxi/versions/1:predict")
        assert code == 200 and headers["X-Skewless-Variant"] == "direct" and headers["X-Skewless-Model-Version"] == "1"
        code, body, headers = post(url, {"instances": [{"fare": 1.0}]}, path="/v1/models/taxi/labels/canary:predict")
        assert code == 200 and headers["X-Skewless-Variant"] == "direct" and headers["X-Skewless-Model-Version"] == "2"
        for user in range(20):
            headers = post(url, {"instances": [{"fare": 1.0}]}, {"X-User-Id": f"u{user}", "X-Skewless-Variant": "canary"})[2]
            assert headers["X-Skewless-Variant"] == "canary" and headers["X-Skewless-Model-Version"] == "2"
        code, body, _ = post(url, {"instances": [{"fare": 1.0}]}, {"X-Skewless-Variant": "nope"})
        assert code == 400 and "'nope'" in body["error"] and "canary" in body["error"]
    finally:
        stop()


def test_shadow_gets_a_copy_and_never_answers(backend, tmp_path):
    env = ab_env(backend, PROXY_SHADOW="canary")
    proxy, url, stop = start_proxy(env, log_path=str(tmp_path / "log.sqlite"))
    try:
        for i in range(40):
            code, body, headers = post(url, {"instances": [{"fare": float(i)}]})
            assert code == 200 and headers["X-Skewless-Variant"] == "stable"
            assert body["predictions"][0]["score"] == pytest.approx(i / 100)
    finally:
        stats = stop()
    assert stats["written"] == 80 and stats["deferred"] == 0
    logged = rows(str(tmp_path / "log.sqlite"))
    answered = [r for r in logged if not r["shadow"]]
    shadows = {r["request_id"]: r for r in logged if r["shadow"]}
    assert len(answered) == 40 and len(shadows) == 40
    for r in answered:
        copy = shadows[r["request_id"] + ":shadow"]
        assert copy["variant"] == "canary" and copy["model_version"] == 2 and copy["request"] == r["request"]
        assert json.loads(copy["response"])["predictions"][0]["score"] == pytest.approx(
            json.loads(r["response"])["predictions"][0]["score"] + 0.5)
    counted = {s.labels["outcome"]: s.value for m in proxy.registry.collect() if m.name == "skewless_proxy_shadow"
               for s in m.samples if s.name.endswith("_total")}
    # fare < 50: stable says "no"; canary says "yes" from fare > 0 (score > 0.5): class differs but for fare 0.
    assert counted == {"same_class": 1.0, "different_class": 39.0}


def test_switch_threshold_and_timeout_change_on_sighup_without_a_restart(backend, tmp_path):
    env_file = tmp_path / "proxy.env"
    env_file.write_text("PROXY_ENABLED=false\nPROXY_FALLBACK={\"classes\": \"no\", \"score\": 0.0}\n")
    proxy, url, stop = start_proxy({"PROXY_BACKEND": backend.url}, env_file=str(env_file))
    try:
        code, body, headers = post(url, {"instances": [{"fare": 80.0}, {"fare": 5.0}]})
        assert code == 200 and headers["X-Skewless-Fallback"] == "true" and body["skewless"] == {"fallback": True}
        assert body["predictions"] == [{"classes": "no", "score": 0.0}] * 2
        assert backend.paths == []  # no model was called
        env_file.write_text('PROXY_ENABLED=true\nPROXY_THRESHOLD=0.9\nPROXY_CLASSES=["no", "yes"]\n')
        assert proxy.reload()  # what SIGHUP does in the CLI (tested in the restart test)
        code, body, _ = post(url, {"instances": [{"fare": 30.0}, {"fare": 45.0}]})
        # The latest version scores 0.8 and 0.95, so the model itself says "yes" to both.
        assert [p["class_ids"] for p in body["predictions"]] == [0, 1] and body["skewless"]["threshold"] == 0.9
        assert [p["classes"] for p in body["predictions"]] == ["no", "yes"]
        env_file.write_text('PROXY_THRESHOLD=1.01\n')
        assert not proxy.reload()  # refused: the message names the key; the previous settings stay
        assert proxy.settings.threshold == 0.9
        backend.delay = 0.5
        env_file.write_text('PROXY_TIMEOUT_SECONDS=0.1\nPROXY_RETRIES=0\n')
        assert proxy.reload()
        code, body, _ = post(url, {"instances": [{"fare": 1.0}]})
        assert code == 504 and "did not answer within 0.1 s" in body["error"] and "variant 'default'" in body["error"]
    finally:
        stop()


def test_a_backends_cookie_never_rides_on_later_calls(backend):
    """The backend client keeps no cookies: aiohttp's default jar keeps a named host's Set-Cookie and
    sends it with every later call, so one client's answer would shape what the next one's call carries."""
    backend.cookie = "session=first-client"
    proxy, url, stop = start_proxy({"PROXY_BACKEND": f"http://localhost:{backend.port}"})
    try:
        assert [post(url, {"instances": [{"fare": fare}]})[0] for fare in (10, 20, 30)] == [200, 200, 200]
    finally:
        stop()
    assert backend.cookies == [None, None, None]


def _refuse_constant(name):
    raise ValueError(f"{name} is not JSON")


@pytest.mark.parametrize("raw, kept, scores", [
    # The backend's own text goes on as it is (formatting included), with "skewless" added last.
    (b'{\n    "predictions": [{"score": 0.25}]\n}\n', '{\n    "predictions": [{"score": 0.25}], "skewless": ', [0.25]),
    # Bare NaN (TF Serving's writer) and a number beyond a double are not JSON a client can read: null.
    (b'{"predictions": [{"score": NaN}, {"score": 1e400}]}', None, [None, None]),
    # A backend's own "skewless" key is replaced, not repeated.
    (b'{"predictions": [{"score": 0.5}], "skewless": "the backend\'s"}', None, [0.5]),
])
def test_the_answer_is_strict_json_with_one_skewless_object(backend, raw, kept, scores):
    backend.raw_answer = raw
    proxy, url, stop = start_proxy({"PROXY_BACKEND": backend.url})
    try:
        request = urllib.request.Request(url + "/v1/models/taxi:predict", method="POST",
                                         data=json.dumps({"instances": [{"fare": 1.0}]}).encode())
        with urllib.request.urlopen(request, timeout=30) as r:
            text = r.read().decode()
    finally:
        stop()
    answer = json.loads(text, parse_constant=_refuse_constant)
    assert [p["score"] for p in answer["predictions"]] == scores
    assert answer["skewless"] == {"variant": "default", "model_version": 2, "policy": "model"}
    assert text.count('"skewless"') == 1
    if kept is not None:
        assert text.startswith(kept)


def test_bad_settings_name_the_key():
    from serving.proxy import ConfigError, Settings

    cases = {"PROXY_ENABLED": ("maybe", "must be true or false .*got 'maybe'"),
             "PROXY_THRESHOLD": ("high", "must be a number, got 'high'"),
             "PROXY_VARIANTS": ('{"a": {"weight": 1, "lable": "x"}}',
                                r"PROXY_VARIANTS.a.lable: unknown key \(allowed: backend, label, version, weight\)"),
             "PROXY_SHADDOW": ("b", r"PROXY_SHADDOW: unknown key \(allowed: .*PROXY_SHADOW"),
             "PROXY_RETRIES": ("1.5", "PROXY_RETRIES: must be a whole number, got '1.5'"),
             "PROXY_SHADOW": ("nobody", "'nobody' is not a variant"),
             "PROXY_BACKEND": ("localhost:8501", "expected http://host:port")}
    for key, (value, message) in cases.items():
        with pytest.raises(ConfigError, match=message) as raised:
            Settings({key: value})
        assert str(raised.value).startswith(key)


def test_bad_requests_get_4xx_and_the_proxy_keeps_serving(backend):
    _, url, stop = start_proxy({"PROXY_BACKEND": backend.url})
    try:
        assert post(url, None, raw=b"{not json")[0] == 400
        assert post(url, None, raw=b"[1, 2]")[0] == 400
        code, body, _ = post(url, {"instances": [{}]}, path="/v1/models/taxi:explode")
        assert code == 400 and body["error"] == "Malformed request: POST /v1/models/taxi:explode"  # as TF Serving
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)
        conn.putrequest("POST", "/v1/models/taxi:predict")
        conn.putheader("Content-Length", str(9 * 1024 * 1024))  # refused before the body is sent
        conn.endheaders()
        response = conn.getresponse()
        # serving/http.py: refused unread (413, RFC 9110 15.5.14), the limit named, the connection closed
        assert response.status == 413 and response.getheader("Connection") == "close"
        error = json.loads(response.read())["error"]
        assert "Content-Length 9437184" in error and str(8 * 1024 * 1024) in error
        conn.close()
        code, body, _ = post(url, {"signature_name": "x"})  # the backend's own 400 passes through
        assert code == 400 and "instances" in body["error"]
        assert post(url, {"instances": [{"fare": 1.0}]})[0] == 200
        # A client's mistake is never a backend failure (it would fire SkewlessBackendUnavailable).
        errors = samples(url, "skewless_proxy_backend_errors")
        assert not [s for s in errors if s.value > 0], errors
    finally:
        stop()


def samples(url, family):
    """The samples of one metric family on the proxy's metrics page (parsed by prometheus_client)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/monitoring/prometheus/metrics", timeout=10) as r:
        text = r.read().decode()
    return [s for f in text_string_to_metric_families(text) if f.name == family for s in f.samples]


def test_past_the_in_flight_cap_a_request_waits_for_a_slot_then_gets_503_from_the_proxy_itself():
    """PROXY_MAX_IN_FLIGHT=1, a backend taking 0.8 s, PROXY_TIMEOUT_SECONDS=1.2, three requests at once:
    the first is called at once, the second waits 0.8 s for the slot (within its deadline) and is
    answered, the third would wait 1.6 s and gets 503 at its deadline. 503 is UNAVAILABLE in TF
    Serving's REST status map (ToHTTPStatusCode, tensorflow_serving/model_servers/http_server.cc:71-72
    at 021efbd), what its own full batching queue answers, so TF Serving clients retry it elsewhere.
    It is the proxy's queue: skewless_proxy_backend_errors stays 0, skewless_proxy_overloaded counts it."""
    slow = FakeServing(delay=0.8)
    _, url, stop = start_proxy({"PROXY_BACKEND": slow.url, "PROXY_MAX_IN_FLIGHT": "1",
                                "PROXY_TIMEOUT_SECONDS": "1.2", "PROXY_RETRIES": "0"})
    try:
        post(url, {"instances": [{"fare": 0.0}]})  # resolves the version first: the three only wait for the slot
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda i: post(url, {"instances": [{"fare": float(i)}]}), range(3)))
        codes = sorted(a[0] for a in answers)
        refused = [a for a in answers if a[0] != 200]
        assert codes == [200, 200, 503], answers
        assert "PROXY_MAX_IN_FLIGHT" in refused[0][1]["error"] and "1.2 s" in refused[0][1]["error"]
        assert not [s for s in samples(url, "skewless_proxy_backend_errors") if s.value > 0]
        assert [s.value for s in samples(url, "skewless_proxy_overloaded") if s.name.endswith("_total")] == [1.0]
        assert post(url, {"instances": [{"fare": 1.0}]})[0] == 200  # the slot came back
    finally:
        stop()
        slow.close()


def test_every_request_is_logged_under_concurrency(backend, tmp_path):
    log = str(tmp_path / "log.sqlite")
    _, url, stop = start_proxy(ab_env(backend), log_path=log)
    sent = []

    def client(k):
        for i in range(50):
            code, body, headers = post(url, {"instances": [{"fare": float(i), "payment_type": "Cash"}]},
                                       {"X-User-Id": f"u{k}"})
            assert code == 200
            sent.append((headers["X-Request-Id"], headers["X-Skewless-Variant"]))

    with ThreadPoolExecutor(20) as pool:
        list(pool.map(client, range(20)))
    stats = stop()
    assert len(sent) == 1000 and stats["written"] == 1000 and stats["deferred"] == stats["lost"] == 0
    logged = {r["request_id"]: r for r in rows(log)}
    assert len(logged) == 1000
    for request_id, variant in sent:
        r = logged[request_id]
        assert r["variant"] == variant and r["model_version"] == VERSIONS[variant] and r["status"] == 200
        assert json.loads(r["request"])["instances"][0]["payment_type"] == "Cash"
        assert "predictions" in json.loads(r["response"]) and r["latency_ms"] > 0 and r["routing_key"].startswith("u")
    assert not os.listdir(log + ".spool")  # everything committed: no spool left behind


def _proxy_process(tmp_path, backend, log):
    port_file = tmp_path / "port"
    if port_file.exists():
        port_file.unlink()
    env = dict(os.environ, PROXY_BACKEND=backend.url, PYTHONPATH=REPO)
    process = subprocess.Popen([sys.executable, "-m", "serving.proxy", "--port", "0", "--port_file", str(port_file),
                                "--log", log], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not port_file.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read().decode()
        time.sleep(0.05)
    return process, f"http://127.0.0.1:{port_file.read_text()}"


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL])
def test_nothing_acknowledged_is_lost_across_a_restart(backend, tmp_path, stop_signal):
    """N answered requests -> N rows, whether the proxy is stopped (SIGTERM) or killed (SIGKILL)."""
    log = str(tmp_path / "log.sqlite")
    process, url = _proxy_process(tmp_path, backend, log)
    acknowledged = []
    with ThreadPoolExecutor(8) as pool:
        for code, _, headers in pool.map(lambda i: post(url, {"instances": [{"fare": float(i % 90)}]}), range(400)):
            assert code == 200
            acknowledged.append(headers["X-Request-Id"])
    process.send_signal(stop_signal)
    process.wait(timeout=60)
    # Restart: a killed proxy's spool is replayed; then stop it gracefully.
    process, url = _proxy_process(tmp_path, backend, log)
    assert post(url, {"instances": [{"fare": 1.0}]})[0] == 200
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=60)[0].decode()
    logged = {r["request_id"] for r in rows(log)}
    assert set(acknowledged) <= logged and len(logged) == 401, output


def test_an_unavailable_store_does_not_stop_serving_and_the_loss_is_counted(backend, tmp_path):
    log = tmp_path / "log.sqlite"
    log.mkdir()  # a directory where the database should be: every write fails
    proxy, url, stop = start_proxy({"PROXY_BACKEND": backend.url}, log_path=str(log))
    try:
        for i in range(30):
            assert post(url, {"instances": [{"fare": 1.0}]})[0] == 200
        metrics = urllib.request.urlopen(url + "/monitoring/prometheus/metrics").read().decode()
        assert "skewless_prediction_log_written_total 0.0" in metrics
    finally:
        stats = stop()
    assert stats["written"] == 0 and stats["deferred"] == 30 and stats["last_error"].startswith("store:")
    reported = {s.name: s.value for m in proxy.registry.collect() for s in m.samples}
    assert reported["skewless_prediction_log_deferred"] == 30 and reported["skewless_prediction_log_lost_total"] == 0
    from serving.predlog import PredictionLog

    # The records waited in the spool: once the store is back, the next start writes them.
    log.rmdir()
    assert PredictionLog(str(log)).close()["recovered"] == 30 and len(rows(str(log))) == 30


def test_backend_down_is_a_503_naming_it_and_the_proxy_recovers_when_it_returns(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, url, stop = start_proxy({"PROXY_BACKEND": f"http://127.0.0.1:{port}", "PROXY_RETRIES": "1"})
    try:
        code, body, headers = post(url, {"instances": [{"fare": 1.0}]})
        assert code == 503 and headers["X-Skewless-Variant"] == "default"
        assert f"variant 'default' (http://127.0.0.1:{port}) unavailable after 2 tries" in body["error"]
        fake = FakeServing(port=port)
        try:
            code, body, _ = post(url, {"instances": [{"fare": 1.0}]})
            assert code == 200 and body["predictions"][0]["score"] == pytest.approx(0.51)
        finally:
            fake.close()
    finally:
        stop()


def test_against_the_local_server_answers_equal_direct_calls(small_model, tmp_path):
    import shutil

    from tests.conftest import serve

    for version in (1, 2):
        shutil.copytree(small_model[0], tmp_path / "repo" / "taxi" / str(version))
    server = serve(tmp_path / "repo", {"taxi": {"stable": 1, "canary": 2}})
    direct = server.url
    env = {"PROXY_BACKEND": direct, "PROXY_VARIANTS": json.dumps({"stable": {"label": "stable", "weight": 1},
                                                                  "canary": {"label": "canary", "weight": 1}})}
    _, url, stop = start_proxy(env, log_path=str(tmp_path / "log.sqlite"))
    instance = {"payment_type": "Cash", "fare": 7.25, "trip_miles": 1.1, "trip_start_hour": 14}
    inputs = server.servables.repository.resolve("taxi").signatures["serving_default"].structured_input_signature[1]
    full = {name: instance.get(name, "" if spec.dtype.name == "string" else math.nan) for name, spec in inputs.items()}
    try:
        # The server refuses a row without every named input, as TF Serving does; the proxy
        # completes it from the model's metadata with the wire form of a gap (NaN / "").
        code, body, _ = post(direct, {"instances": [instance]}, path="/v1/models/taxi/labels/stable:predict")
        assert code == 400 and "keys must be equal to" in body["error"]
        for user in range(20):
            code, body, headers = post(url, {"instances": [instance]}, {"X-User-Id": str(user)})
            variant = headers["X-Skewless-Variant"]
            want = post(direct, {"instances": [full]}, path=f"/v1/models/taxi/labels/{variant}:predict")[1]
            assert code == 200 and body["predictions"] == want["predictions"]
            assert body["skewless"]["model_version"] == {"stable": 1, "canary": 2}[variant]
    finally:
        stop()
        server.stop()
    assert len(rows(str(tmp_path / "log.sqlite"))) == 20


def test_sighup_applies_the_env_file_in_the_running_process(backend, tmp_path):
    env_file = tmp_path / "proxy.env"
    env_file.write_text("PROXY_ENABLED=true\n")
    port_file = tmp_path / "port"
    env = dict(os.environ, PROXY_BACKEND=backend.url, PYTHONPATH=REPO)
    process = subprocess.Popen([sys.executable, "-m", "serving.proxy", "--port", "0", "--port_file", str(port_file),
                                "--log", "", "--env_file", str(env_file)], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port_file.read_text()}"
        assert "X-Skewless-Fallback" not in post(url, {"instances": [{"fare": 1.0}]})[2]
        env_file.write_text('PROXY_ENABLED=false\nPROXY_FALLBACK={"classes": "no"}\n')
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:  # the signal is handled between two requests of the main loop
            code, body, headers = post(url, {"instances": [{"fare": 1.0}]})
            if headers.get("X-Skewless-Fallback") == "true" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert code == 200 and body["predictions"] == [{"classes": "no"}] and process.poll() is None
        env_file.write_text("PROXY_ENABLED=perhaps\n")  # refused; the process keeps the last good settings
        process.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert post(url, {"instances": [{"fare": 1.0}]})[2].get("X-Skewless-Fallback") == "true"
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0].decode()
    assert "PROXY_ENABLED: must be true or false (1/0, yes/no, on/off), got 'perhaps'" in output


def test_readiness_waits_for_every_variants_label(backend):
    def ready(url):
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    env = {"PROXY_BACKEND": backend.url, "PROXY_MODEL": "taxi",
           "PROXY_VARIANTS": json.dumps({"stable": {"label": "stable"}, "canary": {"label": "canary"}})}
    _, url, stop = start_proxy(env)
    try:
        assert ready(url) == (200, {"status": "ok", "problems": []})
        backend.labels.pop("canary")  # the canary label is not there (not promoted yet)
        code, body = ready(url)
        assert code == 503 and len(body["problems"]) == 1
        # TF Serving answers an unknown label with 400 INVALID_ARGUMENT (server_core.cc:873-892).
        assert "variant 'canary': GET /v1/models/taxi/labels/canary/metadata answered 400" in body["problems"][0]
    finally:
        stop()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, url, stop = start_proxy({"PROXY_BACKEND": f"http://127.0.0.1:{port}"})  # no PROXY_MODEL: reachability
    try:
        code, body = ready(url)
        assert code == 503 and "unavailable" in body["problems"][0]
    finally:
        stop()


def test_bearer_tokens_guard_the_api_and_leave_health_open(backend, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# callers\ns3cret-one\n\ns3cret-two  # the batch job\n")
    _, url, stop = start_proxy({"PROXY_BACKEND": backend.url, "PROXY_AUTH_TOKENS_FILE": str(tokens)})
    try:
        code, body, headers = post(url, {"instances": [{"fare": 1.0}]})
        assert code == 401 and "Bearer" in body["error"]
        assert {k.lower(): v for k, v in headers.items()}["www-authenticate"].startswith("Bearer")
        assert post(url, {"instances": [{"fare": 1.0}]}, {"Authorization": "Bearer s3cret-on"})[0] == 401
        assert post(url, {"instances": [{"fare": 1.0}]}, {"Authorization": "Basic s3cret-one"})[0] == 401
        assert post(url, {"instances": [{"fare": 1.0}]}, {"Authorization": "Bearer s3cret-one"})[0] == 200
        assert post(url, {"instances": [{"fare": 1.0}]}, {"Authorization": "Bearer s3cret-two"})[0] == 200
        assert backend.paths and all(":predict" in p for p in backend.paths) and len(backend.paths) == 2
        with urllib.request.urlopen(url + "/healthz", timeout=10) as r:
            assert r.status == 200
        with urllib.request.urlopen(url + "/monitoring/prometheus/metrics", timeout=10) as r:
            assert b'skewless_proxy_client_errors_total{reason="auth"} 3.0' in r.read()
    finally:
        stop()
    tokens.write_text("# nobody\n")
    from serving.proxy import ConfigError, Settings

    with pytest.raises(ConfigError, match=r"PROXY_AUTH_TOKENS_FILE: .*tokens holds no token"):
        Settings({"PROXY_AUTH_TOKENS_FILE": str(tokens)})


def test_the_log_hashes_the_routing_key_redacts_named_features_and_truncates_big_bodies(backend, tmp_path):
    log = str(tmp_path / "log.sqlite")
    env = {"PROXY_BACKEND": backend.url, "PROXY_HASH_ROUTING_KEY": "true", "PROXY_HASH_SALT": "pepper",
           "PROXY_REDACT_FEATURES": '["company"]', "PROXY_LOG_MAX_BODY_BYTES": "2048", "PROXY_MAX_ROWS": "100"}
    _, url, stop = start_proxy(env, log_path=log)
    try:
        small = post(url, {"instances": [{"fare": 1.0, "company": "Acme"}]}, {"X-User-Id": "alice"})
        big = post(url, {"instances": [{"fare": float(i), "company": "Acme"} for i in range(100)]})
        too_many = post(url, {"instances": [{"fare": 1.0}] * 101})
        too_many_columns = post(url, {"inputs": {"fare": [1.0] * 101}})
    finally:
        stop()
    assert small[0] == big[0] == 200 and len(big[1]["predictions"]) == 100
    assert too_many[0] == too_many_columns[0] == 400 and "at most 100 (PROXY_MAX_ROWS)" in too_many[1]["error"]
    import hashlib

    from serving import logstore

    records = {r["request_id"]: r for r in logstore.read_records(log)}
    first = records[small[2]["X-Request-Id"]]
    assert first["routing_key"] == "sha256:" + hashlib.sha256(b"pepperalice").hexdigest()
    assert first["request"]["instances"] == [{"fare": 1.0, "company": "[redacted]"}]
    second = records[big[2]["X-Request-Id"]]
    for column in ("request", "response"):
        assert second[column]["skewless_truncated"] is True and second[column]["bytes"] > 2048
        assert len(json.dumps(second[column])) <= 2048
    assert "Acme" not in json.dumps(second["request"]["head"])  # redacted before it was cut


def test_metrics_stay_bounded_and_a_non_finite_score_stays_out_of_the_histogram(tmp_path):
    fake = FakeServing()
    _, url, stop = start_proxy({"PROXY_BACKEND": fake.url})
    try:
        assert post(url, {"instances": [{"fare": 10.0}]})[0] == 200
        for i in range(300):  # random model names: answered 404 by the backend
            assert post(url, {"instances": [{"fare": 1.0}]}, path=f"/v1/models/m{i}:predict")[0] == 404
        # TF Serving writes non-finite outputs as bare tokens: 1e400 parses to infinity.
        fake_answer = b'{"predictions": [{"score": 1e400}, {"score": NaN}, {"score": 0.25}]}'
        from serving.proxy import Proxy

        proxy = Proxy(env={"PROXY_BACKEND": fake.url}, watch_seconds=0)
        proxy.observe_scores("taxi", "default", json.loads(fake_answer))
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for m in proxy.registry.collect() for s in m.samples}
        assert samples[("skewless_proxy_nonfinite_scores_total", (("model", "taxi"), ("variant", "default")))] == 2
        assert samples[("skewless_proxy_prediction_score_sum", (("model", "taxi"), ("variant", "default")))] == 0.25
        metrics = urllib.request.urlopen(url + "/monitoring/prometheus/metrics").read().decode()
    finally:
        stop()
        fake.close()
    assert 'model="m1"' not in metrics and 'model="other"' in metrics and 'model="taxi"' in metrics
    models = set(re.findall(r'model="([^"]*)"', metrics))
    assert models == {"taxi", "other"}


def test_metadata_kept_for_client_chosen_model_paths_is_bounded(monkeypatch):
    """Every model name a client puts in a URL makes the proxy ask the backend's metadata once and
    keep the answer (a 404: None); 3,000 names keep at most MAX_METADATA_ENTRIES, the newest kept,
    and the completion table follows them out."""
    import asyncio

    from serving import proxy as proxy_module
    from serving.proxy import MAX_METADATA_ENTRIES, Proxy

    proxy = Proxy(env={"PROXY_BACKEND": "http://127.0.0.1:9"}, watch_seconds=0)
    asked = []

    async def call(backend, method, path, body, timeout, retries, api):
        asked.append(path)
        if path == "/v1/models/taxi/metadata":
            return 200, json.dumps({"model_spec": {"name": "taxi", "version": "3"}}).encode()
        return 404, b'{"error": "Servable not found"}'

    monkeypatch.setattr(proxy.backends, "call", call)
    monkeypatch.setattr(proxy_module, "MAX_METADATA_ENTRIES", 100)

    async def run():
        assert (await proxy.metadata("b", "/v1/models/taxi"))["model_spec"]["version"] == "3"
        for i in range(3000):
            assert await proxy.metadata("b", f"/v1/models/m{i}") is None
            await proxy.missing_value_fills("b", f"/v1/models/m{i}", "serving_default")

    asyncio.run(run())
    assert len(proxy._metadata) == 100 and len(proxy._fills) <= 100
    assert ("b", "/v1/models/m2999") in proxy._metadata and ("b", "/v1/models/taxi") not in proxy._metadata
    assert set(proxy._fills) <= set(proxy._metadata)
    assert MAX_METADATA_ENTRIES == 1024  # the bound the proxy runs with


@pytest.mark.parametrize("policy", ["fallback", "stable", "random"])
def test_holdback_users_are_answered_without_the_model_and_carry_policy_and_propensity(backend, tmp_path, policy):
    """The feedback-loop guard: a sticky 20 % of users never get the model under training."""
    from serving import logstore

    log = str(tmp_path / "log.sqlite")
    env = {"PROXY_BACKEND": backend.url, "PROXY_VARIANTS": json.dumps({"candidate": {"label": "canary"}}),
           "PROXY_HOLDBACK_SHARE": "0.2", "PROXY_HOLDBACK_POLICY": policy, "PROXY_FALLBACK": '{"classes": "no"}',
           "PROXY_CLASSES": '["no", "yes"]'}
    _, url, stop = start_proxy(env, log_path=log)
    try:
        answers = {u: post(url, {"instances": [{"fare": 10.0}]}, {"X-User-Id": f"user-{u}"}) for u in range(1000)}
        again = {u: post(url, {"instances": [{"fare": 10.0}]}, {"X-User-Id": f"user-{u}"})[2]["X-Skewless-Policy"]
                 for u in range(0, 1000, 25)}
    finally:
        stop()
    held = {u for u, (_, _, h) in answers.items() if h["X-Skewless-Policy"] == f"holdback:{policy}"}
    assert 0.17 < len(held) / 1000 < 0.23  # binomial sd over 1000 users is 1.3 %
    assert all(answers[u][2]["X-Skewless-Policy"] == "model" for u in set(answers) - held)
    assert all(again[u] == answers[u][2]["X-Skewless-Policy"] for u in again)  # sticky
    canary = [p for p in backend.paths if p == "/v1/models/taxi/versions/2:predict"]
    assert len(canary) == 1000 - len(held) + sum(1 for u in again if u not in held)  # held users never reach it
    records = [r for r in logstore.read_records(log)]
    by_policy = {}
    for r in records:
        by_policy.setdefault(r["policy"], set()).add(round(r["propensity"], 12))
    expected = {"fallback": 0.2, "stable": 0.2, "random": 0.1}[policy]
    assert by_policy == {"model": {0.8}, f"holdback:{policy}": {expected}}
    held_answers = [answers[u][1]["predictions"][0] for u in held]
    if policy == "fallback":
        assert all(a == {"classes": "no"} for a in held_answers)
    elif policy == "stable":  # the stable label's version 1 computed them: score fare / 100
        assert all(a["score"] == pytest.approx(0.1) for a in held_answers)
        assert {r["model_version"] for r in records if r["policy"] == "holdback:stable"} == {1}
    else:
        drawn = [a["classes"] for a in held_answers]
        assert set(drawn) == {"no", "yes"} and abs(drawn.count("yes") / len(drawn) - 0.5) < 0.15


def test_holdback_settings_name_the_key():
    from serving.proxy import ConfigError, Settings

    with pytest.raises(ConfigError, match="PROXY_HOLDBACK_SHARE: must be at most 0.5, got '0.9'"):
        Settings({"PROXY_HOLDBACK_SHARE": "0.9"})
    with pytest.raises(ConfigError, match="PROXY_HOLDBACK_POLICY: 'coin' is not one of fallback, stable or random"):
        Settings({"PROXY_HOLDBACK_SHARE": "0.1", "PROXY_HOLDBACK_POLICY": "coin"})
    with pytest.raises(ConfigError, match="random draws a class uniformly from PROXY_CLASSES"):
        Settings({"PROXY_HOLDBACK_SHARE": "0.1", "PROXY_HOLDBACK_POLICY": "random"})


def test_a_stable_holdback_on_the_label_the_model_answers_from_is_refused():
    """configs/proxy.env answers everyone from `stable`, PROXY_HOLDBACK_LABEL's default: held-back users
    would get the same model, so the guard would hold nothing back."""
    from serving.proxy import ConfigError, Settings

    served_from_stable = {"PROXY_VARIANTS": json.dumps({"stable": {"label": "stable", "weight": 1}}),
                          "PROXY_HOLDBACK_SHARE": "0.1", "PROXY_HOLDBACK_POLICY": "stable"}
    with pytest.raises(ConfigError) as refused:
        Settings(served_from_stable)
    for named in ("PROXY_HOLDBACK_LABEL", "'stable'", "variant 'stable'", "PROXY_HOLDBACK_POLICY=fallback",
                  '"label": "canary"'):
        assert named in str(refused.value)
    with pytest.raises(ConfigError, match="variant 'b' of PROXY_VARIANTS"):  # any answering variant, not the first
        Settings({**served_from_stable, "PROXY_VARIANTS": json.dumps({"a": {"label": "canary"},
                                                                      "b": {"label": "stable"}})})
    # Accepted: the model from canary, held-back users from stable; a shadow on stable never answers;
    # a label of the same name on another backend is another model.
    assert Settings({**served_from_stable, "PROXY_VARIANTS": json.dumps({"candidate": {"label": "canary"}})}).holdback
    assert Settings({**served_from_stable, "PROXY_SHADOW": "old", "PROXY_VARIANTS": json.dumps(
        {"candidate": {"label": "canary"}, "old": {"label": "stable"}})}).holdback.label == "stable"
    assert Settings({**served_from_stable, "PROXY_VARIANTS": json.dumps(
        {"candidate": {"label": "canary"}, "far": {"label": "stable", "backend": "http://10.0.0.9:8501"}})})
    assert Settings({**served_from_stable, "PROXY_HOLDBACK_POLICY": "fallback"}).holdback.policy == "fallback"


@pytest.mark.parametrize("verb, live, shadow, outcome", [
    ("predict", {"predictions": [{"classes": "yes"}, {"classes": "no"}]},
     {"predictions": [{"classes": "yes"}, {"classes": "no"}]}, "same_class"),
    ("predict", {"predictions": [{"class_ids": [1]}]}, {"predictions": [{"class_ids": [0]}]}, "different_class"),
    ("predict", {"outputs": {"class_ids": [[1], [0]]}}, {"outputs": {"class_ids": [[1], [1]]}}, "different_class"),
    # :classify answers carry no classes field: the top-scored label is what counts
    ("classify", {"results": [[["no", 0.3], ["yes", 0.7]]]}, {"results": [[["no", 0.4], ["yes", 0.6]]]},
     "same_class"),
    ("classify", {"results": [[["no", 0.3], ["yes", 0.7]]]}, {"results": [[["no", 0.6], ["yes", 0.4]]]},
     "different_class"),
    # regression: a number per row, equal within SHADOW_VALUE_TOLERANCE (relative)
    ("regress", {"results": [10.0, 2.0]}, {"results": [10.005, 2.001]}, "same_value"),
    ("regress", {"results": [10.0, 2.0]}, {"results": [10.5, 2.0]}, "different_value"),
    ("predict", {"predictions": [[3.0]]}, {"predictions": [[3.0]]}, "same_value"),
    ("predict", {"predictions": [{"value": [3.0]}]}, {"predictions": [{"value": [4.0]}]}, "different_value"),
    # what used to count as same_class: all([]) of no dict rows, None == None without a class field
    ("classify", {"results": []}, {"results": []}, "incomparable"),
    ("predict", {"predictions": [{"score": 0.2}]}, {"predictions": [{"score": 0.9}]}, "incomparable"),
    ("predict", {"predictions": [{"classes": "no"}]}, {"predictions": [{"classes": "no"}, {"classes": "no"}]},
     "incomparable"),
    ("predict", {"predictions": [{"classes": "no"}]}, {"predictions": [[0.4]]}, "incomparable"),
])
def test_shadow_agreement_per_api(verb, live, shadow, outcome):
    from serving import proxy

    assert proxy.shadow_outcome(verb, live, shadow) == outcome


def test_load_generator_counts_requests_errors_and_reconnects(backend):
    from serving import loadgen

    port = backend.port
    good = [json.dumps({"instances": [{"fare": float(i)}]}).encode() for i in range(3)]
    measured = loadgen.sequential({"fake": port}, "/v1/models/taxi:predict", good, 30, warmup=5)["fake"]
    assert measured["requests"] == 30 and measured["errors"] == 0
    assert 0 < measured["p50_ms"] <= measured["p99_ms"]
    # a refused request (400: no 'instances') is an error; the bodies alternate, so half of them fail
    mixed = [good[0], json.dumps({"inputs": {}}).encode()]
    assert loadgen.sequential({"fake": port}, "/v1/models/taxi:predict", mixed, 10)["fake"]["errors"] == 5
    loaded = loadgen.concurrent(port, "/v1/models/taxi:predict", good, clients=4, seconds=0.5)
    assert loaded["clients"] == 4 and loaded["requests"] > 4 and loaded["errors"] == 0
    assert loaded["requests_per_second"] == pytest.approx(loaded["requests"] / loaded["seconds"])
    # the senders' CPU: some, and no more than every core for the whole run
    assert 0 < loaded["client_cpu_ms_per_request"] <= 1.1 * os.cpu_count() * loaded["seconds"] * 1e3 / loaded["requests"]
    # alternating turns: each server gets its share of the time, the counts add up over the turns
    both = loadgen.alternating({"a": port, "b": port}, "/v1/models/taxi:predict", good, 2, 0.6, rounds=3)
    for run in both.values():
        assert run["errors"] == 0 and run["requests"] > 3 and run["seconds"] == pytest.approx(0.6, abs=0.3)
        assert run["requests_per_second"] == pytest.approx(run["requests"] / run["seconds"])
    # a client count per name (bench-serving's 50 batched clients beside their one-client reference)
    counts = loadgen.alternating({"one": port, "four": port}, "/v1/models/taxi:predict", good, {"one": 1, "four": 4},
                                 0.4, rounds=2)
    assert [(run["clients"], run["errors"], run["requests"] > 1) for run in counts.values()] == [(1, 0, True), (4, 0, True)]
    # another process's CPU is read from /proc: this process read that way agrees with process_time()
    assert loadgen.cpu_seconds(os.getpid()) == pytest.approx(loadgen.cpu_seconds(), abs=0.05)
    # nothing listens: every request is an error, and the client reconnects instead of stopping
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    refused = loadgen.sequential({"gone": closed}, "/v1/models/taxi:predict", good, 3)["gone"]
    assert refused == {**refused, "requests": 3, "errors": 3}


def _push(repository, version, vocabularies=None, spec=True):
    """A complete version folder as Pusher leaves it, with the serving spec the trainer writes
    (components/export.py serving_spec: `vocabularies` only when the Transform had vocabulary features)."""
    folder = repository / "taxi" / str(version)
    folder.mkdir(parents=True)
    if spec:
        written = {"task": "binary", "classes": ["no", "yes"],
                   "features": {"payment_type": {"type": "string", "required": True}}}
        if vocabularies is not None:
            written["vocabularies"] = vocabularies
        (folder / "assets.extra").mkdir()
        (folder / "assets.extra" / "serving_spec.json").write_text(json.dumps(written))
    (folder / "saved_model.pb").write_bytes(b"")


@pytest.fixture
def repository(tmp_path):
    """taxi 1 and 2 with different vocabularies (2 learnt Bitcoin and Yellow); 3 exported without a
    serving spec; 4 with a spec from before the trainer wrote vocabularies."""
    root = tmp_path / "model_repository"
    _push(root, 1, {"payment_type": ["Cash", "Credit Card"], "company": ["Flash Cab"],
                    "trip_start_hour": [str(h) for h in range(24)]})
    _push(root, 2, {"payment_type": ["Cash", "Credit Card", "Bitcoin"], "company": ["Flash Cab", "Yellow"]})
    _push(root, 3, spec=False)
    _push(root, 4)
    return root


def _unseen(proxy):
    """{feature: count} of skewless_proxy_unseen_categories, by (model, feature)."""
    return {(s.labels["model"], s.labels["feature"]): s.value for metric in proxy.registry.collect()
            if metric.name == "skewless_proxy_unseen_categories" for s in metric.samples if s.name.endswith("_total")}


def test_unseen_categories_are_counted_against_the_version_that_answered(backend, repository):
    rows = {"instances": [{"payment_type": "Bitcoin", "company": "Flash Cab", "city": "Nowhere"},
                          {"payment_type": ["Barter"], "company": ""},  # "" is missing, not a category
                          {"payment_type": "Cash", "company": "Yellow", "trip_start_hour": 25}]}
    proxy, url, stop = start_proxy({"PROXY_BACKEND": backend.url, "PROXY_MODEL_REPOSITORY": str(repository),
                                    "PROXY_VARIANTS": json.dumps({"stable": {"label": "stable"}})})
    try:
        code, _, headers = post(url, rows)
        assert (code, headers["X-Skewless-Model-Version"]) == (200, "1")
        # Version 1 never saw Bitcoin, Barter, Yellow nor hour 25.
        assert _unseen(proxy) == {("taxi", "payment_type"): 2.0, ("taxi", "company"): 1.0,
                                  ("taxi", "trip_start_hour"): 1.0}
        # `stable` moves to 2 and 1 is unloaded: the proxy's call to /versions/1 gets 404 and it calls 2.
        backend.labels["stable"], backend.loaded = 2, {2}
        code, _, headers = post(url, rows)
        assert (code, headers["X-Skewless-Model-Version"]) == (200, "2")
        # Version 2 knows Bitcoin and Yellow and has no hour vocabulary: only Barter is new to it.
        assert _unseen(proxy) == {("taxi", "payment_type"): 3.0, ("taxi", "company"): 1.0,
                                  ("taxi", "trip_start_hour"): 1.0}
        # A model the backend does not serve: 404, nothing read, no series for its name.
        assert post(url, rows, path="/v1/models/nope:predict")[0] == 404
        assert post(url, rows, path="/v1/models/..:predict")[0] == 404
        metrics = urllib.request.urlopen(url + "/monitoring/prometheus/metrics").read().decode()
    finally:
        stop()
    counted = re.findall(r'^skewless_proxy_unseen_categories_total\{(.*)\} (\S+)$', metrics, re.M)
    assert sorted(counted) == [('feature="company",model="taxi"', "1.0"), ('feature="payment_type",model="taxi"', "3.0"),
                               ('feature="trip_start_hour",model="taxi"', "1.0")]
    assert sorted(proxy._vocabularies) == [(str(repository), "taxi", 1), (str(repository), "taxi", 2)]


def test_a_version_without_vocabularies_counts_nothing_says_so_once_and_answers(backend, repository, caplog):
    backend.loaded = {1, 2, 3, 4}
    proxy, url, stop = start_proxy({
        "PROXY_BACKEND": backend.url, "PROXY_MODEL_REPOSITORY": str(repository), "PROXY_ALLOW_CLIENT_ROUTING": "true",
        "PROXY_VARIANTS": json.dumps({"no_spec": {"version": 3}, "old_spec": {"version": 4, "weight": 0}})})
    try:
        answered = []
        with caplog.at_level("WARNING"):
            for variant in ("no_spec", "old_spec") * 3:
                code, answer, headers = post(url, {"instances": [{"payment_type": "Bitcoin", "fare": 10.0}]},
                                             headers={"X-Skewless-Variant": variant})
                answered.append((code, headers["X-Skewless-Model-Version"], answer["predictions"][0]["score"]))
    finally:
        stop()
    assert answered == [(200, "3", 0.35), (200, "4", 0.1)] * 3  # the fake's score: fare / 100 + OFFSET
    assert _unseen(proxy) == {}
    said = [r.getMessage() for r in caplog.records if "unseen categories of taxi" in r.getMessage()]
    folder = repository / "taxi"
    assert said == [f"unseen categories of taxi version 3 are not counted: {folder / '3' / 'assets.extra' / 'serving_spec.json'} "
                    f"is missing or empty (PROXY_MODEL_REPOSITORY is {repository}; is it the folder TF Serving serves?)",
                    f"unseen categories of taxi version 4 are not counted: {folder / '4' / 'assets.extra' / 'serving_spec.json'} "
                    "has no `vocabularies` object of lists (a model exported before the trainer wrote them): re-export "
                    "it to count them"]


def test_the_model_repository_setting_is_checked_and_the_one_way_to_count(tmp_path):
    from serving.proxy import ConfigError, Settings

    with pytest.raises(ConfigError, match=f"PROXY_MODEL_REPOSITORY: {tmp_path / 'absent'} is not a folder: mount"):
        Settings({"PROXY_MODEL_REPOSITORY": str(tmp_path / "absent")})
    # One spec file for every version went stale at the first promotion: the key is gone, and refused.
    with pytest.raises(ConfigError, match="PROXY_SERVING_SPEC.*unknown key"):
        Settings({"PROXY_SERVING_SPEC": str(tmp_path / "serving_spec.json")})


def test_the_vocabulary_cache_is_bounded_and_an_unreadable_spec_is_asked_again(repository, monkeypatch):
    import asyncio

    from serving import proxy as proxy_module
    from serving.proxy import Proxy

    proxy = Proxy(env={"PROXY_MODEL_REPOSITORY": str(repository)}, watch_seconds=0)
    reads = []
    real = proxy_module.read_vocabularies

    def read(*key):
        reads.append(key[2])
        if len(reads) == 1:
            raise OSError(5, "Input/output error")  # a network volume's hiccup
        return real(*key)

    monkeypatch.setattr(proxy_module, "read_vocabularies", read)
    monkeypatch.setattr(proxy_module, "MAX_VOCABULARY_VERSIONS", 2)
    body = {"instances": [{"payment_type": "Bitcoin"}]}

    async def serve(*versions):
        for version in versions:
            await proxy.count_unseen(str(repository), "taxi", version, body)

    asyncio.run(serve(1, 1))  # the failed read stands for a while: not asked again per request
    assert reads == [1] and _unseen(proxy) == {}
    key = (str(repository), "taxi", 1)
    assert proxy._vocabularies[key][0] > time.monotonic() + proxy_module.UNREADABLE_RETRY_SECONDS - 5
    proxy._vocabularies[key] = (time.monotonic() - 1, None)  # ... UNREADABLE_RETRY_SECONDS later
    asyncio.run(serve(1, 2, 1, 4, 2))  # 1 is read again; 4 pushes 1 out (oldest first), 2 stays
    assert reads == [1, 1, 2, 4]
    assert [k[2] for k in proxy._vocabularies] == [2, 4]
    # Bitcoin is new to 1 (counted twice), not to 2; a name the backend never confirmed is "other"
    assert _unseen(proxy) == {("other", "payment_type"): 2.0}
