"""Release mechanics without a pipeline run: models.config, the two-phase label move, the wait.

(Lineage, refusal of unblessed versions and rollback over a real ML Metadata store are tested
end to end in test_pipeline_e2e.py.)
"""

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from google.protobuf import text_format

from tests.test_version_guard import _check_model_config


def _repository(tmp_path, versions=(100, 200), labels=None):
    for v in versions:
        os.makedirs(tmp_path / "taxi" / str(v))
        (tmp_path / "taxi" / str(v) / "saved_model.pb").write_bytes(b"")  # complete, as Pusher leaves it
    if labels:
        from tests.conftest import write_models_config

        write_models_config(tmp_path, {"taxi": labels})
    return str(tmp_path)


def _config(repo):
    from tensorflow_serving.config import model_server_config_pb2

    with open(os.path.join(repo, "models.config")) as f:
        return text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())


def _entry(version, label="stable", previous=None):
    return {"action": "promote", "label": label, "version": version, "previous": previous, "who": "t", "when": "now"}


class StatusStub:
    """Stands in for TF Serving's status API; records what was on disk at every poll."""

    def __init__(self, repo, answers):
        self.repo, self.answers, self.seen = repo, list(answers), []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                config = _config(stub.repo).model_config_list.config[0]
                stub.seen.append((self.path, sorted(config.model_version_policy.specific.versions),
                                  dict(config.version_labels)))
                state = stub.answers.pop(0) if len(stub.answers) > 1 else stub.answers[0]
                if state is None:
                    self.send_response(404)
                    body = {"error": "Servable not found"}
                else:
                    self.send_response(200)
                    body = {"model_version_status": [{"version": "200", "state": state, "status": {
                        "error_code": "OK" if state != "END" else "UNKNOWN", "error_message": "bad graph"}}]}
                data = json.dumps(body).encode()
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()


def test_models_config_is_a_model_server_config_with_labels_on_loaded_versions(tmp_path):
    from ops import release

    repo = _repository(tmp_path, versions=(100,))
    release.release(repo, "taxi", _entry(100), base_path="/models")
    config = _config(repo)
    _check_model_config(config, version=100)
    # A model pushed but never promoted is not served at all (train-then-serve).
    os.makedirs(tmp_path / "other" / "5")
    release.write_model_config(repo, "/models")
    assert [c.name for c in _config(repo).model_config_list.config] == ["taxi"]


def test_the_label_moves_only_after_the_server_reports_the_new_version_available(tmp_path):
    from ops import release

    repo = _repository(tmp_path, labels={"stable": 100})
    stub = StatusStub(repo, [None, "LOADING", "AVAILABLE"])
    try:
        release.release(repo, "taxi", _entry(200, previous=100), serving_url=stub.url, wait_seconds=30)
    finally:
        stub.close()
    # While the server was asked, the config listed 200 but `stable` still pointed at 100.
    assert [s[0] for s in stub.seen] == ["/v1/models/taxi/versions/200"] * 3
    assert all(versions == [100, 200] and labels == {"stable": 100} for _, versions, labels in stub.seen)
    model = _config(repo).model_config_list.config[0]
    assert dict(model.version_labels) == {"stable": 200}
    # The replaced version stays loaded for one release, so a rollback is a label move.
    assert list(model.model_version_policy.specific.versions) == [100, 200]
    assert release.read_labels(str(tmp_path), "taxi") == {"stable": 200}
    assert [e["version"] for e in release.read_log(str(tmp_path / "taxi"))] == [200]


def test_a_canary_is_a_second_label_on_a_second_loaded_version(tmp_path):
    from ops import release

    repo = _repository(tmp_path, versions=(100, 200, 300), labels={"stable": 100})
    release.release(repo, "taxi", _entry(300, label="canary"))
    model = _config(repo).model_config_list.config[0]
    assert dict(model.version_labels) == {"stable": 100, "canary": 300}
    assert list(model.model_version_policy.specific.versions) == [100, 300]  # 200 was never promoted


@pytest.mark.parametrize("answers, message", [
    (["END"], "could not load version 200: bad graph"),
    ([None], r"not AVAILABLE after 1 s \(last: HTTP 404\)"),
])
def test_a_version_the_server_does_not_load_keeps_the_label_where_it_was(tmp_path, answers, message):
    from ops import release

    repo = _repository(tmp_path, labels={"stable": 100})
    stub = StatusStub(repo, answers)
    try:
        with pytest.raises(release.ReleaseError, match=message):
            release.release(repo, "taxi", _entry(200, previous=100), serving_url=stub.url, wait_seconds=1)
    finally:
        stub.close()
    assert release.read_labels(str(tmp_path), "taxi") == {"stable": 100}
    assert release.read_log(str(tmp_path / "taxi")) == []  # nothing took effect, nothing is logged
    assert dict(_config(repo).model_config_list.config[0].version_labels) == {"stable": 100}


def test_the_local_server_is_a_valid_serving_url(small_model, tmp_path):
    """Against the local server: it reports a new version AVAILABLE and then serves the moved label."""
    import shutil
    import urllib.request

    from ops import release
    from tests.conftest import serve

    shutil.copytree(small_model[0], tmp_path / "taxi" / "7")
    server = serve(tmp_path, poll_seconds=0.2)
    repo = server.servables.repository.start()
    url = server.url
    try:
        release.release(str(tmp_path), "taxi", _entry(7), serving_url=url, wait_seconds=30)
        deadline = time.monotonic() + 30
        while "stable" not in repo.snapshot("taxi").labels and time.monotonic() < deadline:
            time.sleep(0.1)
        with urllib.request.urlopen(f"{url}/v1/models/taxi/labels/stable") as r:
            assert json.loads(r.read())["model_version_status"][0]["version"] == "7"
    finally:
        server.stop()
        repo.stop()
