"""pipelines/local_runner.py around a fake orchestrator: what the terminal shows for a run, the exit codes
and run_summary.json. The fake records each node in ML Metadata the way TFX 1.16 does, which is all the
runner's console (pipelines/console.py) and summary (pipelines/report.py) read; no component runs."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from pipelines import local_runner, mlmd
from tests.conftest import REPO, TAXI_SPEC, component_lines, read_rows, taxi_csv_path, write_sample

ENDED = r"^  {node} +{mark} +\d+\.\d s$"


class FakeDagRunner:
    """LocalDagRunner's record of a run without running anything: a pipeline_run context, then for each
    node a `node` context named '<pipeline>.<node id>' and one execution associated with both (TFX 1.16
    tfx/dsl/compiler/node_contexts_compiler.py:42-45 and 108-114, compiler_utils.py:200-202), COMPLETE,
    or FAILED at `fail_at`, where it raises as an executor would. It prints as the libraries do."""

    fail_at = None
    nodes = []  # the node ids it recorded, in order

    def run(self, pipeline):
        from ml_metadata.metadata_store import metadata_store
        from ml_metadata.proto import metadata_store_pb2 as pb2

        store = metadata_store.MetadataStore(pipeline.metadata_connection_config)
        name = pipeline.pipeline_info.pipeline_name
        node_type = store.put_context_type(pb2.ContextType(name="node"))
        run_type = store.put_context_type(pb2.ContextType(name="pipeline_run"))
        [run_id] = store.put_contexts([pb2.Context(type_id=run_type, name=f"{name}_run")])
        print("INFO:tensorflow:Assets written to: /tmp/model", flush=True)
        os.write(2, b"E cuda_dnn.cc: Unable to register cuDNN factory\n")
        FakeDagRunner.nodes = []
        for node in pipeline.components:
            FakeDagRunner.nodes.append(node.id)
            state = pb2.Execution.FAILED if node.id == self.fail_at else pb2.Execution.COMPLETE
            [node_id] = store.put_contexts([pb2.Context(type_id=node_type, name=f"{name}.{node.id}")])
            execution_type = store.put_execution_type(pb2.ExecutionType(name=type(node).__name__))
            [execution_id] = store.put_executions([pb2.Execution(type_id=execution_type, last_known_state=state)])
            store.put_attributions_and_associations(
                [], [pb2.Association(context_id=c, execution_id=execution_id) for c in (run_id, node_id)])
            if state == pb2.Execution.FAILED:
                raise RuntimeError("indices[0] = -1 is not in [0, 3)")


@pytest.fixture
def run_args(tmp_path, taxi_spec):
    """main()'s arguments for the taxi spec on 200 of its rows, everything written under tmp_path."""
    data = tmp_path / "data"
    write_sample(read_rows(taxi_csv_path(taxi_spec), limit=200), str(data))
    env = tmp_path / "env.yaml"
    env.write_text(yaml.safe_dump({"pipeline_root": f"{tmp_path}/root", "metadata_path": f"{tmp_path}/m.sqlite",
                                   "model_repository": f"{tmp_path}/models", "beam_profile": "direct_in_memory"}))
    return {"args": ["--spec", TAXI_SPEC, "--env", str(env), "--data", str(data),
                     "--summary", str(tmp_path / "run_summary.json")],
            "summary": tmp_path / "run_summary.json", "store": str(tmp_path / "m.sqlite"), "data": str(data)}


@pytest.fixture
def fake_run(run_args, monkeypatch):
    """run_args, with FakeDagRunner in place of LocalDagRunner."""
    from tfx.orchestration.local import local_dag_runner

    monkeypatch.setattr(local_dag_runner, "LocalDagRunner", FakeDagRunner)
    monkeypatch.setattr(FakeDagRunner, "fail_at", None)
    return run_args


def _lines(text):
    return text.splitlines()


def test_a_run_prints_a_line_per_component_then_the_summary_and_keeps_library_lines_in_the_log(fake_run, capfd):
    import re

    assert local_runner.main(fake_run["args"]) == 0
    terminal = capfd.readouterr()
    out = _lines(terminal.out)
    assert terminal.err == ""
    assert out[0] == f"skewless: running pipeline 'taxi' on {fake_run['data']}"
    nodes = FakeDagRunner.nodes
    assert len(nodes) > 5 and nodes[0] == "CsvExampleGen" and nodes[-1] == "Pusher"
    assert component_lines(terminal.out) == {node: 1 for node in nodes}  # one line each, nothing else
    for line, node in zip(out[1:], nodes):  # in the order ML Metadata recorded them
        assert re.match(ENDED.format(node=node, mark="done"), line), line
    summary_lines = out[1 + len(nodes):]
    assert summary_lines[0] == "" and re.fullmatch(r"== taxi: succeeded in \d+ s ==", summary_lines[1])
    assert summary_lines[2:] == ["blessed: False   pushed: False", summary_lines[-1]]  # nothing evaluated
    log = summary_lines[-1].removeprefix("full log: ")
    assert os.path.dirname(log) == str(fake_run["summary"].parent / "logs") and log.endswith(".log")
    text = open(log).read()
    assert "cuDNN factory" in text and "INFO:tensorflow:Assets" in text  # the libraries' lines: log only

    summary = json.loads(fake_run["summary"].read_text())
    assert summary["succeeded"] and summary["error"] is None and summary["log"] == log
    assert list(summary["seconds_per_component"]) == nodes and summary["inputs_fingerprint"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    tag = mlmd.latest_run(mlmd.connect(fake_run["store"])).custom_properties[mlmd.CODE_COMMIT].string_value
    assert head and tag.split("+")[0] == head and tag.removeprefix(head) in ("", "+uncommitted")


def test_a_failed_component_is_printed_once_cause_first_and_exits_1(fake_run, capfd):
    import re

    FakeDagRunner.fail_at = "Trainer"
    assert local_runner.main(fake_run["args"]) == 1
    terminal = capfd.readouterr()
    out, err = _lines(terminal.out), _lines(terminal.err)
    log = err[-1].removeprefix("full log: ")
    assert err == ["error: Trainer: RuntimeError: indices[0] = -1 is not in [0, 3)", f"full log: {log}"]
    nodes = FakeDagRunner.nodes
    assert nodes[-1] == "Trainer" and len(out) == 1 + len(nodes)  # no summary digest after a failure
    assert re.match(ENDED.format(node="Trainer", mark="FAILED"), out[-1]), out[-1]
    assert "Traceback" not in terminal.out + terminal.err and "Traceback" in open(log).read()
    summary = json.loads(fake_run["summary"].read_text())
    assert not summary["succeeded"] and summary["error"] == "RuntimeError: indices[0] = -1 is not in [0, 3)"


def test_a_retrain_with_nothing_new_exits_3_before_tfx_is_imported(run_args):
    """make retrain on a one-CSV spec: refused in the span rules (pipelines/span_window.py), which import no
    TFX, so the answer comes without TFX's 15-25 s of imports."""
    args = run_args["args"] + ["--require_new_span"]
    probe = ("import sys; from pipelines import local_runner; code = local_runner.main(%r); "
             "print('exit', code, 'tfx' in sys.modules)" % args)
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines()[-1] == "exit 3 False", done.stdout + done.stderr
    assert done.stderr.startswith("nothing to retrain on: ") and "is one dataset, not spans" in done.stderr
