"""The rooms and their walls (.importlinter): serving imports nothing of training; the pipeline
and its components import nothing of ops; ops uses no runner; the proxy needs no TensorFlow."""

import os
import subprocess
import sys

from tests.conftest import REPO

LINT = os.path.join(os.path.dirname(sys.executable), "lint-imports")


def lint(cwd, env=None):
    return subprocess.run([LINT, "--config", os.path.join(REPO, ".importlinter")], cwd=cwd, capture_output=True,
                          text=True, env=env)


def test_the_repository_keeps_every_contract():
    ok = lint(REPO)
    assert ok.returncode == 0 and "4 kept, 0 broken" in ok.stdout, ok.stdout + ok.stderr


def test_each_contract_catches_its_violation(tmp_path):
    modules = {
        "serving/leak.py": "from components import preprocessing\n",  # serving -> training code
        "serving/predlog.py": "import json\n", "serving/logstore.py": "import sqlite3\n",
        "serving/retention.py": "from serving import logstore\n",
        "serving/proxy.py": "from serving import server\n",  # the proxy -> TensorFlow
        "serving/server.py": "import tensorflow\n", "serving/wire.py": "import json\n",
        "serving/http.py": "import json\n",
        # the proxy's half of the repository layout -> TF Serving's protos (absent from the proxy's image)
        "serving/repository_layout.py": "from tensorflow_serving.config import model_server_config_pb2\n",
        "components/preprocessing.py": "",
        "pipelines/pipeline.py": "from ops import release\n",  # the pipeline -> ops
        "pipelines/local_runner.py": "", "pipelines/kubeflow_runner.py": "",
        "pipelines/kubeflow_entrypoint.py": "",
        "ops/release.py": "", "ops/monitor.py": "from pipelines import local_runner\n",  # ops -> a runner
    }
    for package in ("serving", "components", "pipelines", "ops"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    for path, text in modules.items():
        (tmp_path / path).write_text(text)
    bad = lint(tmp_path, dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert bad.returncode != 0 and "0 kept, 4 broken" in bad.stdout, bad.stdout
    for arrow in ("serving.leak -> components.preprocessing", "serving.proxy -> serving.server",
                  "serving.repository_layout -> tensorflow_serving",
                  "pipelines.pipeline -> ops.release", "ops.monitor -> pipelines.local_runner"):
        assert arrow in bad.stdout, bad.stdout
