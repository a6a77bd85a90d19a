"""pipelines/console.py without a pipeline run: what reaches the terminal and what the log."""

import io
import logging
import os
import types

from components import feature_spec
from pipelines import console as console_lib


class Terminal(io.StringIO):
    def isatty(self):
        return True


def _execution(started_s_ago):
    return types.SimpleNamespace(id=7, create_time_since_epoch=(console_lib.time.time() - started_s_ago) * 1000)


def test_a_long_component_gets_a_line_per_interval_in_a_file_and_one_rewritten_line_on_a_tty():
    piped = io.StringIO()
    watcher = console_lib.ProgressWatcher(None, stream=piped, still_every=60)
    for seconds in (5, 61, 62, 125):
        watcher._progress(_execution(seconds), "Trainer")
    assert [line.split() for line in piped.getvalue().splitlines()] == [["Trainer", "running", "61", "s"],
                                                                          ["Trainer", "running", "125", "s"]]
    tty = Terminal()
    watcher = console_lib.ProgressWatcher(None, stream=tty)
    for seconds in (1, 3, 4):
        watcher._progress(_execution(seconds), "Trainer")
    watcher._write("  Trainer done 4.0 s")
    assert "\n" not in tty.getvalue()[:-1]  # one line, rewritten in place, ended when the component is
    assert tty.getvalue().count("running") == 2 and tty.getvalue().endswith("\r\x1b[K  Trainer done 4.0 s\n")


def test_the_console_sends_every_library_line_to_the_log_and_shows_our_warnings_once(tmp_path, capfd):
    log = str(tmp_path / "run.log")
    own = os.path.join(feature_spec.REPO_ROOT, "components", "strategy.py")
    ours = "training.strategy.type multi_worker without TF_CONFIG: training as a single worker"
    with console_lib.Console(log, quiet=False) as console:
        os.write(2, b"E cuda_dnn.cc: Unable to register cuDNN factory\n")  # C++ writes to the descriptor
        print("INFO:tensorflow:Assets written to: /tmp/model", flush=True)
        logging.getLogger("some_library").info("TFMA deprecation notice")  # a library INFO record (absl's own logger level depends on what ran before)
        for _ in range(2):
            logging.getLogger().handle(logging.makeLogRecord(
                {"msg": ours, "levelno": logging.WARNING, "levelname": "WARNING", "pathname": own}))
        logging.getLogger("apache_beam").warning("a library's warning")
        console.out.write("  CsvExampleGen done 1.0 s\n")
    terminal = capfd.readouterr()
    assert terminal.out == f"  warning: {ours}\n  CsvExampleGen done 1.0 s\n" and terminal.err == ""
    with open(log) as f:
        text = f.read()
    for line in ("cuDNN factory", "INFO:tensorflow:Assets", "TFMA deprecation notice", "a library's warning"):
        assert line in text, line
    os.write(1, b"after\n")  # the descriptors are the terminal's again
    assert capfd.readouterr().out == "after\n"


def test_progress_polls_share_one_metadata_connection_and_reconnect_after_a_failure(tmp_path, monkeypatch):
    from pipelines import mlmd

    from ml_metadata.proto import metadata_store_pb2

    config = metadata_store_pb2.ConnectionConfig()
    config.sqlite.filename_uri = str(tmp_path / "m.sqlite")
    config.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READWRITE_OPENCREATE
    opened = []
    real = mlmd.store_for
    monkeypatch.setattr(mlmd, "store_for", lambda c: opened.append(c) or real(c))
    watcher = console_lib.ProgressWatcher(config, stream=io.StringIO())
    for _ in range(3):
        watcher.poll()
    assert len(opened) == 1  # opening a store costs 2.9 ms CPU here, the queries of a poll 1.4 ms
    monkeypatch.setattr(mlmd, "latest_run", lambda *a, **k: 1 / 0)
    watcher.poll()  # a failed poll is swallowed and drops the connection
    monkeypatch.undo()
    monkeypatch.setattr(mlmd, "store_for", lambda c: opened.append(c) or real(c))
    watcher.poll()
    assert len(opened) == 2
