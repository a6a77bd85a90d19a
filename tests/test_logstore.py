"""The prediction log's store (serving/logstore.py): one body of tests run on SQLite and on a real
PostgreSQL server on loopback (tests/conftest.py's postgres_server), plus the retention job."""

import json
import sqlite3
import subprocess
import sys
import threading

import prometheus_client
import pytest

from serving import logstore, retention
from tests.conftest import POSTGRES_PASSWORD, REPO

T0 = 1_700_000_000.123456789  # not a round binary fraction: a float column that rounds would show


def row(request_id, ts=T0, model="taxi", shadow=0, client_request_id=None, variant="stable", request=None,
        model_version=3, routing_key=None, status=200, policy="model", propensity=0.95):
    body = request if request is not None else json.dumps({"instances": [{"fare": 1.5}]})
    return (request_id, client_request_id, ts, model, variant, model_version, shadow, "predict", status, 4.25,
            routing_key, body, json.dumps({"predictions": [[0.25]]}), policy, propensity)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "log.sqlite")
    return request.getfixturevalue("postgres_url")


def ids(records):
    return [r["request_id"] for r in records]


def test_every_column_round_trips(url):
    stored = [
        row("a" * 32, client_request_id="client-1", model_version=1_700_000_000_123, routing_key="user-42",
            request='{"instances": [{"company": "Taxi Affiliation Service 漢字 ☂ \U0001f695"}]}'),
        row("b" * 32, ts=T0 + 1e-6, model_version=None, shadow=1, variant="canary", status=503,
            request="not json: \x00 and a lone \\ud800 escape"),
    ]
    with logstore.open_store(url) as store:
        assert store.insert(stored) == 2
        records = list(store.read(include_shadow=True))
    assert records[0] == dict(zip(logstore.COLUMNS, stored[0]))
    assert records[0]["ts"] == T0 and type(records[0]["model_version"]) is int
    # NUL cannot be stored in PostgreSQL's TEXT: both stores keep U+FFFD in its place.
    assert records[1] == dict(zip(logstore.COLUMNS, stored[1]), request="not json: \ufffd and a lone \\ud800 escape")
    assert records[1]["client_request_id"] is None and records[1]["model_version"] is None


def test_duplicate_request_ids_are_ignored_and_the_first_row_stays(url):
    with logstore.open_store(url) as store:
        assert store.insert([row("r1"), row("r2")]) == 2
        assert store.insert([row("r1", variant="other"), row("r2")]) == 0
        assert store.insert([row("r2"), row("r3"), row("r3")]) == 1
        assert store.insert([]) == 0
        assert store.count() == 3
        assert [r["variant"] for r in store.read()] == ["stable"] * 3


def test_client_request_ids_need_not_be_unique(url):
    with logstore.open_store(url) as store:
        assert store.insert([row("s1", client_request_id="same"), row("s2", client_request_id="same")]) == 2
        assert [r["client_request_id"] for r in store.read()] == ["same", "same"]


def test_window_model_shadow_and_order(url):
    rows = [row("z", ts=T0 + 2), row("b", ts=T0), row("a", ts=T0), row("c", ts=T0 + 1, shadow=1),
            row("p", ts=T0 + 1, model="penguin"), row("late", ts=T0 + 3)]
    with logstore.open_store(url) as store:
        store.insert(rows)
        assert ids(store.read()) == ["a", "b", "p", "z", "late"]  # by ts, ties by request_id; shadow left out
        assert ids(store.read(include_shadow=True)) == ["a", "b", "c", "p", "z", "late"]
        assert ids(store.read(start=T0 + 1, end=T0 + 3, include_shadow=True)) == ["c", "p", "z"]  # [start, end)
        assert ids(store.read(model="taxi", end=T0 + 2)) == ["a", "b"]
        assert store.models() == {"taxi": 4, "penguin": 1}
        assert store.models(start=T0 + 1, include_shadow=True) == {"taxi": 3, "penguin": 1}


def test_delete_by_age_then_by_rows(url):
    with logstore.open_store(url) as store:
        store.insert([row(f"r{i:02d}", ts=T0 + i) for i in range(20)] + [row("tie-a", ts=T0 + 15),
                                                                           row("tie-b", ts=T0 + 15)])
        assert store.delete(older_than=T0 + 5) == 5  # r00..r04
        assert store.delete(older_than=T0 + 5) == 0
        assert store.delete(keep_rows=6) == 11
        # The newest six; of the three rows at T0 + 15, r15 sorts first (by request_id, as read() orders) and goes.
        assert ids(store.read()) == ["tie-a", "tie-b", "r16", "r17", "r18", "r19"]
        assert store.delete(older_than=T0 + 17, keep_rows=1) == 3 + 2
        assert ids(store.read()) == ["r19"] and store.count() == 1
        assert store.delete(keep_rows=5) == 0


def test_concurrent_first_opens_create_one_table(postgres_url):
    """Replicas that start together each create the table: the schema lock keeps them from racing."""
    errors = []

    def open_and_insert(n):
        try:
            with logstore.open_store(postgres_url) as store:
                store.insert([row(f"replica-{n}")])
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=open_and_insert, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with logstore.open_store(postgres_url, readonly=True) as store:
        assert store.count() == 8


def test_read_records_decodes_json_and_keeps_other_bodies_as_none(url):
    with logstore.open_store(url) as store:
        store.insert([row("j", request='{"instances": [{"fare": 2}]}'), row("n", request="fare=2")])
    records = {r["request_id"]: r for r in logstore.read_records(url)}
    assert records["j"]["request"] == {"instances": [{"fare": 2}]} and records["n"]["request"] is None
    assert records["j"]["response"] == {"predictions": [[0.25]]}
    assert logstore.instances(records["j"]["request"]) == [{"fare": 2}]


def test_a_readonly_store_writes_nothing(url):
    logstore.open_store(url).close()
    with logstore.open_store(url, readonly=True) as store:
        with pytest.raises(logstore.StoreError, match="cannot insert rows: .*read-?only"):
            store.insert([row("r1")])
        assert store.count() == 0


def test_a_row_the_table_refuses_is_a_store_error_naming_the_url(url):
    with logstore.open_store(url) as store:
        with pytest.raises(logstore.StoreError) as info:
            store.insert([row("ok"), row("no-model", model=None)])
        assert str(info.value).startswith(f"prediction log {store.url}: cannot insert rows: ")
        assert store.count() == 0  # one transaction: the good row went back too
        with pytest.raises(ValueError, match="has 15 values .* got 2"):
            store.insert([("r", "x")])


def test_readonly_open_of_a_missing_or_foreign_sqlite_file_names_it(tmp_path):
    missing = tmp_path / "nowhere" / "log.sqlite"
    with pytest.raises(logstore.StoreError, match=f"prediction log sqlite://{missing}: no such file"):
        logstore.open_store(str(missing), readonly=True)
    with pytest.raises(logstore.StoreError, match=f"prediction log sqlite://{missing}: cannot open it: "):
        logstore.open_store(str(missing))  # its folder does not exist
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(logstore.StoreError, match=f"{other}: no predictions table: not a prediction log"):
        logstore.open_store(f"sqlite://{other}", readonly=True)
    text = tmp_path / "notes.txt"
    text.write_text("not a database" * 100)
    with pytest.raises(logstore.StoreError, match=f"{text}: cannot open it: file is not a database"):
        logstore.open_store(f"sqlite:{text}")


def test_a_log_written_before_client_request_id_reads_and_gains_the_column(tmp_path):
    path = tmp_path / "old.sqlite"
    added = ("client_request_id", "policy", "propensity")  # columns newer than the oldest logs
    old_columns = [c for c in logstore.COLUMNS if c not in added]
    db = sqlite3.connect(path)
    db.execute(f"CREATE TABLE predictions ({', '.join(old_columns)}, PRIMARY KEY (request_id))")
    old_row = dict(zip(logstore.COLUMNS, row("old")))
    db.execute(f"INSERT INTO predictions VALUES ({', '.join('?' * len(old_columns))})",
               [old_row[c] for c in old_columns])
    db.commit()
    db.close()
    with logstore.open_store(str(path), readonly=True) as store:
        assert list(store.read()) == [dict(old_row, client_request_id=None, policy=None, propensity=None)]
    with logstore.open_store(str(path)) as store:
        store.insert([row("new", client_request_id="c", policy="holdback:fallback", propensity=0.05)])
        assert [(r["request_id"], r["client_request_id"], r["policy"], r["propensity"]) for r in store.read()] == [
            ("new", "c", "holdback:fallback", 0.05), ("old", None, None, None)]


def test_readonly_open_of_an_empty_postgresql_database_says_nothing_wrote_to_it(postgres_url):
    with pytest.raises(logstore.StoreError, match="no predictions table: nothing has written to this log yet"):
        logstore.open_store(postgres_url, readonly=True)


def test_wrong_password_or_port_is_a_store_error_with_the_password_masked(postgres_server):
    database = postgres_server.create_database()
    wrong_password = database.replace(POSTGRES_PASSWORD, "Wr0ng-pa55")
    with pytest.raises(logstore.StoreError) as info:
        logstore.open_store(wrong_password)
    message = str(info.value)
    assert message.startswith("prediction log postgresql://skewless:***@127.0.0.1:")
    assert "cannot connect" in message and "password authentication failed" in message
    assert "Wr0ng-pa55" not in message
    with pytest.raises(logstore.StoreError) as info:
        logstore.open_store(postgres_server.url(port=1), readonly=True)  # nothing listens on port 1
    assert "127.0.0.1:1/" in str(info.value) and "cannot connect" in str(info.value)
    assert POSTGRES_PASSWORD not in str(info.value)


@pytest.mark.parametrize("given, shown", [
    ("sqlite:///var/log/p.sqlite", "sqlite:///var/log/p.sqlite"),
    ("sqlite:////var/log/p.sqlite", "sqlite:///var/log/p.sqlite"),  # SQLAlchemy's form of an absolute path
    ("/var/log/p.sqlite", "sqlite:///var/log/p.sqlite"),
    ("postgresql://u:pw@db:5432/log", "postgresql://u:***@db:5432/log"),
    ("postgres://u@db/log?sslmode=require&password=pw", "postgres://u@db/log?sslmode=require&password=***"),
])
def test_masked_url(given, shown):
    assert logstore.masked_url(given) == shown


def test_relative_sqlite_forms_are_the_working_directory_s(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for given in ("sqlite:logs/p.sqlite", "logs/p.sqlite"):
        assert logstore.masked_url(given) == f"sqlite://{tmp_path}/logs/p.sqlite"


@pytest.mark.parametrize("bad", ["mysql://u:topsecret@db/log", "sqlite://host/p.sqlite", "sqlite:", ""])
def test_a_url_of_no_accepted_form_is_a_value_error_naming_it(bad):
    with pytest.raises(ValueError) as info:
        logstore.open_store(bad)
    message = str(info.value)
    assert (bad.replace("topsecret", "***") or "''") in message and "topsecret" not in message
    assert "sqlite:///absolute/path.sqlite" in message and "postgresql://user:password@host" in message


# --- retention ----------------------------------------------------------------------------

DAY = retention.DAY_SECONDS


def test_retention_by_age_and_rows(url, capsys):
    with logstore.open_store(url) as store:
        store.insert([row(f"d{i}", ts=T0 - i * DAY) for i in range(10)])  # d0 today ... d9 nine days ago
    assert retention.main(["--log", url, "--max_age_days", "7.5"], now=T0) == 0  # d8, d9
    line = capsys.readouterr().out.strip()
    assert line == (f"retention {logstore.masked_url(url)}: deleted 2 rows (older than 2023-11-07T10:13:20Z); "
                    "8 left")
    assert retention.main(["--log", url, "--max_age_days", "3.5", "--max_rows", "2"], now=T0) == 0
    assert capsys.readouterr().out.endswith("deleted 6 rows (older than 2023-11-11T10:13:20Z, then beyond the "
                                            "newest 2); 2 left\n")
    assert ids(logstore.read_records(url)) == ["d1", "d0"]


def test_retention_needs_a_rule_and_names_the_flags(tmp_path, capsys):
    log = str(tmp_path / "log.sqlite")
    with pytest.raises(SystemExit) as info:
        retention.main(["--log", log])
    assert info.value.code == 2 and "give --max_age_days, --max_rows or both" in capsys.readouterr().err
    for flag, value in (("--max_rows", "0"), ("--max_age_days", "-1"), ("--max_rows", "many")):
        with pytest.raises(SystemExit):
            retention.main(["--log", log, flag, value])
        assert f"argument {flag}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        retention.main(["--log", "mysql://db/log", "--max_rows", "5"])
    assert "--log: prediction log URL mysql://db/log: not a prediction log location" in capsys.readouterr().err


def test_retention_runs_as_a_module_and_reports_a_store_failure(tmp_path):
    log = tmp_path / "log.sqlite"
    with logstore.open_store(str(log)) as store:
        store.insert([row("r1", ts=1.0), row("r2", ts=2.0), row("r3", ts=3.0)])
    done = subprocess.run([sys.executable, "-m", "serving.retention", "--log", f"sqlite://{log}", "--max_rows", "1"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.endswith("deleted 2 rows (beyond the newest 1); 1 left\n"), done.stderr
    done = subprocess.run([sys.executable, "-m", "serving.retention", "--log", str(tmp_path / "none" / "x.sqlite"),
                           "--max_rows", "1"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr == f"error: prediction log sqlite://{tmp_path}/none/x.sqlite: no such file\n"
    assert not (tmp_path / "none").exists()


def test_a_record_the_table_would_refuse_is_counted_lost_and_blocks_nothing(tmp_path):
    """A NOT NULL column left empty fails a whole batch on both stores; the writer drops it up front."""
    from serving.predlog import PredictionLog

    url = str(tmp_path / "log.sqlite")
    log = PredictionLog(url, registry=prometheus_client.CollectorRegistry(), flush_seconds=0.01)
    good = {"request_id": "a", "ts": 1.0, "model": "taxi", "variant": "v", "shadow": 0, "api": "predict",
            "status": 200, "latency_ms": 1.0, "request": "{}", "response": "{}"}
    log.log(good)
    log.log({**good, "request_id": "b", "model": None})
    log.log({**good, "request_id": "c"})
    stats = log.close()
    assert (stats["received"], stats["written"], stats["lost"]) == (3, 2, 1)
    assert "without model" in stats["last_error"]
    assert [r["request_id"] for r in logstore.read_records(url)] == ["a", "c"]


def test_a_writer_that_is_behind_takes_batch_after_batch_without_pausing(tmp_path):
    """The writer pauses flush_seconds only when less than a batch waits: 20 batches waiting are
    written at once, where a pause after each would take 20 x 0.3 s."""
    from serving.predlog import PredictionLog

    url = str(tmp_path / "log.sqlite")
    log = PredictionLog(url, registry=prometheus_client.CollectorRegistry(), batch_size=10, flush_seconds=0.3)
    record = {"ts": 1.0, "model": "taxi", "variant": "v", "shadow": 0, "api": "predict", "status": 200,
              "latency_ms": 1.0, "request": "{}", "response": "{}"}
    for i in range(200):
        log.log({**record, "request_id": f"r{i:03d}"})
    assert log.flush(timeout=3.0), log.stats()
    stats = log.close()
    assert (stats["received"], stats["written"], stats["lost"]) == (200, 200, 0)
    assert len(list(logstore.read_records(url))) == 200


LOGGED = {"ts": 1.0, "model": "taxi", "variant": "v", "shadow": 0, "api": "predict", "status": 200,
          "latency_ms": 1.0, "request": "{}", "response": "{}"}


def test_a_spool_directory_that_cannot_be_made_is_logged_with_the_fix_and_requests_still_log(tmp_path, caplog):
    """The proxy's pod before deploy/k8s set PREDLOG_SPOOL_DIR: a read-only place for the spool. The
    process keeps serving (README: an unavailable store never fails a request) and says what to set."""
    from serving.predlog import PredictionLog

    (tmp_path / "file").write_text("")
    spool = tmp_path / "file" / "spool"  # under a regular file: makedirs fails, for root too
    url = str(tmp_path / "log.sqlite")
    registry = prometheus_client.CollectorRegistry()
    with caplog.at_level("ERROR"):
        log = PredictionLog(url, registry=registry, flush_seconds=0.01, spool_dir=str(spool))
    start = log.stats()
    log.log({**LOGGED, "request_id": "a"})
    stats = log.close()
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "PREDLOG_SPOOL_DIR" in said and str(spool) in said and "cannot be created" in said
    assert start["state"] == "degraded" and str(spool) in start["problems"]["spool"]
    assert registry.get_sample_value("skewless_prediction_log_healthy", {"part": "spool"}) == 0
    assert (stats["received"], stats["written"], stats["lost"]) == (1, 1, 0)
    assert ids(logstore.read_records(url)) == ["a"]


def test_a_torn_spool_line_is_skipped_and_counted_at_replay(tmp_path):
    """A crash mid-write leaves a cut last line: the next process replays the whole record before it,
    skips the cut one, counts it (stats, /healthz, skewless_prediction_log_torn_lines) and runs on."""
    from serving.predlog import COLUMNS, PredictionLog

    url, spool = str(tmp_path / "log.sqlite"), tmp_path / "log.sqlite.spool"
    spool.mkdir()
    good = json.dumps({c: {**LOGGED, "request_id": "whole"}.get(c) for c in COLUMNS}) + "\n"
    cut = json.dumps({c: {**LOGGED, "request_id": "cut"}.get(c) for c in COLUMNS})[:40]
    (spool / "segment-000000007.jsonl").write_text(good + cut)
    registry = prometheus_client.CollectorRegistry()
    log = PredictionLog(url, registry=registry, flush_seconds=0.01)
    assert log.flush(timeout=10.0), log.stats()
    log.log({**LOGGED, "request_id": "after"})  # and the log goes on: the next segment is a new number
    stats = log.close()
    assert (stats["recovered"], stats["torn"], stats["written"], stats["lost"]) == (1, 1, 1, 0)
    assert stats["state"] == "ok"
    assert registry.get_sample_value("skewless_prediction_log_torn_lines_total") == 1
    assert sorted(ids(logstore.read_records(url))) == ["after", "whole"]
    assert list(spool.iterdir()) == []
