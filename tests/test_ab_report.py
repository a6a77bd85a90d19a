"""The A/B go/no-go report on synthetic prediction logs (no TensorFlow).

Logs are written through the store the proxy writes with (serving.logstore, its predictions table);
ground truth as CSV or JSON lines. Statistics are checked against computations written here from
the textbook formulas (brute-force DeLong, exact binomial and hypergeometric sums, Welch-Satterthwaite)
or against scikit-learn and scipy functions the report does not use.
"""

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import log_loss as sklearn_log_loss
from sklearn.metrics import roc_auc_score

from ops import ab_report
from ops.ab import report as reporting
from ops.ab import statistics
from serving import logstore

T0 = 1_700_000_000.0
NAMES = ["no", "yes"]


# --- writing logs and labels --------------------------------------------------------------

def record(request_id, variant, response, status=200, rows=1, ts=T0, shadow=0, version=1, latency=5.0,
           api="predict", request=None, model="taxi", client_request_id=None):
    body = request if request is not None else json.dumps({"instances": [{"fare": 1.0}] * rows})
    return {"request_id": request_id, "client_request_id": client_request_id, "ts": ts, "model": model,
            "variant": variant, "model_version": version, "shadow": shadow, "api": api, "status": status,
            "latency_ms": latency, "routing_key": None, "request": body,
            "response": response if isinstance(response, str) else json.dumps(response)}


def write_log(url, records):
    """The records into the log at url (a SQLite path or a PostgreSQL URL); returns url as a string."""
    with logstore.open_store(str(url)) as store:
        assert store.insert([tuple(r.get(c) for c in logstore.COLUMNS) for r in records]) == len(records)
    return str(url)


def binary_answer(scores, threshold=0.5):
    return {"predictions": [{"probabilities": [1 - s, s], "score": s, "classes": NAMES[int(s >= threshold)],
                             "class_ids": int(s >= threshold)} for s in scores]}


def binary_traffic(variant, n, separation, seed, prefix=None, shadow=False, ts=T0, threshold=0.5):
    """n one-row requests: label ~ Bernoulli(0.4), score = sigmoid(separation * (2y - 1) + N(0, 1))."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    scores = 1 / (1 + np.exp(-(separation * (2 * y - 1) + rng.normal(size=n))))
    prefix = prefix or variant
    records = [record(f"{prefix}-{i}" + (":shadow" if shadow else ""), variant, binary_answer([float(s)], threshold),
                      shadow=int(shadow), ts=ts + i) for i, s in enumerate(scores)]
    labels = [{"request_id": f"{prefix}-{i}", "label": NAMES[label]} for i, label in enumerate(y)]
    return records, labels, y, scores


def write_labels_csv(path, labels, columns=("request_id", "label", "row")):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(labels)
    return str(path)


def write_labels_jsonl(path, labels):
    with open(path, "w") as f:
        f.writelines(json.dumps(label) + "\n" for label in labels)
    return str(path)


def run(tmp_path, records, labels, *args, labels_format="csv"):
    """(exit code, JSON report) of the command line on a fresh log."""
    folder = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
    folder.mkdir()
    log = write_log(folder / "log.sqlite", records)
    label_file = (write_labels_csv(folder / "labels.csv", labels) if labels_format == "csv"
                  else write_labels_jsonl(folder / "labels.jsonl", labels))
    out = folder / "report.json"
    code = ab_report.main(["--log", log, "--labels", label_file, "--json", str(out), *args])
    return code, json.loads(out.read_text())


# --- decisions ----------------------------------------------------------------------------

def test_b_clearly_better_is_go(tmp_path, capsys):
    a_records, a_labels, a_y, a_scores = binary_traffic("stable", 600, 0.5, seed=1)
    b_records, b_labels, b_y, b_scores = binary_traffic("canary", 600, 1.5, seed=2)
    code, report = run(tmp_path, a_records + b_records, a_labels + b_labels)
    assert code == 0 and report["decision"]["outcome"] == "GO"
    assert "significantly better on AUC" in report["decision"]["reasons"][0]
    auc = {c["metric"]: c for c in report["comparison"]["metrics"]}["auc"]
    assert auc["method"] == "DeLong test" and auc["p_value"] < 1e-6 and auc["ci_low"] > 0
    assert auc["a"] == pytest.approx(roc_auc_score(a_y, a_scores))
    assert auc["b"] == pytest.approx(roc_auc_score(b_y, b_scores))
    canary = report["variants"]["canary"]
    counts = (canary["requests"], canary["labelled_rows"], canary["unlabelled_rows"], canary["errors"])
    assert counts == (600, 600, 0, 0)
    assert canary["metrics"]["log_loss"] == pytest.approx(sklearn_log_loss(b_y, b_scores))
    assert canary["metrics"]["accuracy"] == pytest.approx(np.mean((b_scores >= 0.5) == b_y))
    assert canary["metrics"]["predicted_positive_rate"] == pytest.approx(np.mean(b_scores >= 0.5))
    printed = capsys.readouterr().out
    assert "Decision: GO (exit code 0)" in printed and "Rule, first match wins:" in printed
    assert "NOT ENOUGH DATA  if A or B has fewer than 200 labelled rows" in printed


def test_b_clearly_worse_is_no_go(tmp_path):
    a_records, a_labels, *_ = binary_traffic("stable", 600, 1.5, seed=3)
    b_records, b_labels, *_ = binary_traffic("canary", 600, 0.5, seed=4)
    code, report = run(tmp_path, a_records + b_records, a_labels + b_labels)
    assert code == 1 and report["decision"]["outcome"] == "NO-GO"
    assert "significantly worse on AUC" in report["decision"]["reasons"][0]


def test_equal_variants_are_not_significant_and_the_margin_decides(tmp_path):
    a_records, a_labels, *_ = binary_traffic("stable", 1500, 1.0, seed=5)
    b_records, b_labels, *_ = binary_traffic("canary", 1500, 1.0, seed=6)
    records, labels = a_records + b_records, a_labels + b_labels
    code, report = run(tmp_path, records, labels)
    auc = {c["metric"]: c for c in report["comparison"]["metrics"]}["auc"]
    assert not auc["significant"] and auc["p_value"] >= 0.05 and auc["ci_low"] < 0 < auc["ci_high"]
    # 1,500 rows a side leave the CI wider than a loss of 0.01 AUC: not enough data yet, and how much more
    assert auc["ci_low"] < -0.01
    assert code == 3 and report["decision"]["outcome"] == "NOT ENOUGH DATA"
    assert "labelled rows per variant would settle it" in report["decision"]["reasons"][1]
    # a looser margin the CI's worst case stays within: non-inferior, GO
    margin = math.ceil(-auc["ci_low"] * 100) / 100 + 0.01
    code, report = run(tmp_path, records, labels, "--margin", str(margin))
    assert code == 0 and "within the margin" in report["decision"]["reasons"][0]


def test_a_guardrail_loss_is_no_go_even_when_the_primary_metric_holds(tmp_path):
    # the same model behind a threshold gone wrong: the ranking (AUC) is intact, the classes are not
    a_records, a_labels, *_ = binary_traffic("stable", 800, 1.0, seed=26)
    b_records, b_labels, *_ = binary_traffic("canary", 800, 1.0, seed=27, threshold=0.1)
    records, labels = a_records + b_records, a_labels + b_labels
    code, report = run(tmp_path, records, labels, "--margin", "0.05")
    by_metric = {c["metric"]: c for c in report["comparison"]["metrics"]}
    assert not by_metric["auc"]["significant"] and by_metric["accuracy"]["p_value"] < 0.025
    assert report["comparison"]["guardrails"] == ["accuracy", "log_loss"]
    assert code == 1 and report["decision"]["reasons"][0].startswith("B is significantly worse on guardrail accuracy")
    assert "(p < 0.025: 0.05 / 2, Bonferroni)" in report["decision"]["rule"][3]
    code, report = run(tmp_path, records, labels, "--margin", "0.05", "--guardrails", "none")
    assert code == 0 and "accuracy" in report["decision"]["warnings"][0]


def test_too_few_labels_is_not_enough_data(tmp_path):
    a_records, a_labels, *_ = binary_traffic("stable", 400, 0.5, seed=7)
    b_records, b_labels, *_ = binary_traffic("canary", 400, 3.0, seed=8)
    code, report = run(tmp_path, a_records + b_records, a_labels[:150] + b_labels[:150])
    assert code == 3 and report["decision"]["outcome"] == "NOT ENOUGH DATA"
    assert report["decision"]["reasons"] == ["labelled rows: A 150, B 150; at least 200 per variant needed"]
    assert report["variants"]["stable"]["unlabelled_rows"] == 250
    code, _ = run(tmp_path, a_records + b_records, a_labels[:150] + b_labels[:150], "--min_samples", "100")
    assert code == 0


def test_errors_are_counted_and_a_higher_error_rate_is_no_go(tmp_path):
    a_records, a_labels, *_ = binary_traffic("stable", 400, 1.0, seed=9)
    b_records, b_labels, *_ = binary_traffic("canary", 400, 3.0, seed=10)  # better predictions...
    failed = [record(f"canary-e{i}", "canary", {"error": "backend unavailable"}, status=503) for i in range(30)]
    failed.append(record("canary-bad", "canary", {"predictions": [{"probabilities": "oops"}]}))  # unreadable 200
    # a malformed client body is logged as received: it must not stop the report
    failed.append(record("stable-junk", "stable", {"error": "JSON Parse error"}, status=400, request="{not json"))
    code, report = run(tmp_path, a_records + b_records + failed,
                       a_labels + b_labels + [{"request_id": "canary-e0", "label": "yes"}])
    canary, stable = report["variants"]["canary"], report["variants"]["stable"]
    assert canary["errors"] == 31 and canary["errors_by_status"] == {"503": 30, "unreadable": 1}
    assert canary["requests"] == 431 and canary["labelled_rows"] == 400
    assert canary["labels_on_failed_requests"] == 1
    assert stable["errors"] == 1 and stable["errors_by_status"] == {"400": 1}
    errors = report["comparison"]["errors"]
    assert errors["b_rate"] == pytest.approx(31 / 431) and errors["a_rate"] == pytest.approx(1 / 401)
    assert code == 1 and "error rate" in report["decision"]["reasons"][0]
    # Fisher's one-sided p from the hypergeometric tail, summed here
    total, errs, n_b = 832, 32, 431
    tail = sum(math.comb(errs, k) * math.comb(total - errs, n_b - k) for k in range(31, errs + 1))
    assert errors["p_value"] == pytest.approx(tail / math.comb(total, n_b), rel=1e-9)


def test_a_few_errors_more_are_not_a_no_go_by_themselves(tmp_path):
    a_records, a_labels, *_ = binary_traffic("stable", 400, 1.0, seed=11)
    b_records, b_labels, *_ = binary_traffic("canary", 400, 3.0, seed=12)
    failed = [record("canary-e", "canary", {"error": "timeout"}, status=504)]
    code, report = run(tmp_path, a_records + b_records + failed, a_labels + b_labels)
    assert report["comparison"]["errors"]["p_value"] > 0.05
    assert code == 0


def test_without_labels_only_errors_can_decide(tmp_path, capsys):
    a_records, *_ = binary_traffic("stable", 300, 1.0, seed=24)
    b_records, *_ = binary_traffic("canary", 300, 1.0, seed=25)
    fallback = [record(f"f{i}", "fallback", {"predictions": [{"score": 0.0, "class_ids": 0}],
                                             "skewless": {"fallback": True}}, version=None) for i in range(3)]
    log = write_log(tmp_path / "log.sqlite", a_records + b_records + fallback)
    assert ab_report.main(["--log", log]) == 3
    printed = capsys.readouterr().out
    assert "labels: none given" in printed and "labelled rows: A 0, B 0; at least 200 per variant needed" in printed
    assert "fallback" in printed  # every variant of the window is listed, not only A and B
    failing = [record(f"down{i}", "canary", {"error": "backend unavailable"}, status=503) for i in range(40)]
    log = write_log(tmp_path / "log2.sqlite", a_records + failing)  # canary never answered
    report_path = tmp_path / "r.json"
    assert ab_report.main(["--log", log, "--json", str(report_path)]) == 1
    report = json.loads(report_path.read_text())
    assert report["variants"]["canary"]["error_rate"] == 1.0 and report["task"] == "binary"


def test_labels_from_a_spreadsheet_export(tmp_path):
    records = [record("r1", "stable", binary_answer([0.9])), record("r2", "canary", binary_answer([0.1]))]
    log = write_log(tmp_path / "log.sqlite", records)
    path = tmp_path / "export.csv"
    path.write_text("\ufeffrequest_id,label\r\nr1,yes\r\nr2,yes\r\n", encoding="utf-8")
    report = reporting.build_report(log, str(path), "taxi", "stable", "canary", min_samples=1)
    assert report["variants"]["stable"]["metrics"]["accuracy"] == 1.0
    assert report["variants"]["canary"]["metrics"]["accuracy"] == 0.0


# --- joining ground truth -----------------------------------------------------------------

def test_labels_join_by_request_id_and_row(tmp_path):
    scores = [0.9, 0.2, 0.7]  # served classes: yes, no, yes
    records = [record("r1", "stable", binary_answer(scores), rows=3), record("r2", "canary", binary_answer([0.6]))]
    labels = [{"request_id": "r1", "row": "1", "label": "no"},    # right
              {"request_id": "r1", "row": "2.0", "label": "0"},   # a class id: wrong; 2.0 as a spreadsheet writes it
              {"request_id": "r1", "row": "", "label": "yes"},    # row left empty is row 0: right
              {"request_id": "r1", "row": "3", "label": "yes"},   # no such row in the answer
              {"request_id": "r2", "label": "no"},                # row column absent
              {"request_id": "elsewhere", "label": "yes"},
              {"request_id": "r3", "label": ""}]                  # not known yet
    log = write_log(tmp_path / "log.sqlite", records)
    for name, path in (("csv", write_labels_csv(tmp_path / "l.csv", labels)),
                       ("jsonl", write_labels_jsonl(tmp_path / "l.jsonl", [
                           {k: v for k, v in label.items() if k != "row" or v} for label in labels]))):
        report = reporting.build_report(log, path, "taxi", "stable", "canary", min_samples=1)
        stable = report["variants"]["stable"]
        assert (stable["rows"], stable["labelled_rows"], stable["unlabelled_rows"]) == (3, 3, 0), name
        assert stable["metrics"]["accuracy"] == pytest.approx(2 / 3), name
        assert stable["metrics"]["log_loss"] == pytest.approx(-(math.log(0.9) + math.log(0.8) + math.log(0.3)) / 3)
        assert report["variants"]["canary"]["metrics"]["accuracy"] == 0.0, name
        assert report["labels_file"]["blank"] == 1 and report["labels_file"]["unmatched_requests"] == 1, name
        assert report["classes"] == NAMES


def test_shadow_answers_join_their_request_and_are_compared_paired(tmp_path):
    rng = np.random.default_rng(13)
    n = 400
    y = (rng.random(n) < 0.5).astype(int)
    noise = rng.normal(size=n)
    live = 1 / (1 + np.exp(-(0.6 * (2 * y - 1) + noise)))
    better = 1 / (1 + np.exp(-(0.7 * (2 * y - 1) + noise)))  # same noise: a paired design sees the difference
    records = [record(f"q{i}", "stable", binary_answer([float(s)]), ts=T0 + i) for i, s in enumerate(live)]
    records += [record(f"q{i}:shadow", "canary", binary_answer([float(s)]), shadow=1, ts=T0 + i)
                for i, s in enumerate(better)]
    labels = [{"request_id": f"q{i}", "label": int(v)} for i, v in enumerate(y)]
    log = write_log(tmp_path / "log.sqlite", records)
    label_file = write_labels_jsonl(tmp_path / "labels.jsonl", labels)
    assert ab_report.main(["--log", log, "--labels", label_file]) == 2  # shadow left out: no 'canary'
    report = reporting.build_report(log, label_file, None, "stable", "canary:shadow", include_shadow=True)
    assert report["comparison"]["paired"] and report["comparison"]["rows_a"] == n
    by_metric = {c["metric"]: c for c in report["comparison"]["metrics"]}
    assert by_metric["auc"]["method"] == "paired DeLong test"
    assert by_metric["accuracy"]["method"].startswith("McNemar")
    assert by_metric["log_loss"]["method"] == "paired t-test"
    assert report["decision"]["outcome"] == "GO" and by_metric["auc"]["p_value"] < 1e-4
    # the same rows as independent samples cannot tell the two apart
    independent = statistics.delong_test(y, live, y, better, 0.05)
    assert independent.p_value > 0.05


def test_labels_may_name_the_request_id_the_client_sent(tmp_path):
    records = [record("3f2a", "stable", binary_answer([0.9]), client_request_id="order-1"),
               record("3f2a:shadow", "canary", binary_answer([0.2]), shadow=1, client_request_id="order-1"),
               record("77c0", "canary", binary_answer([0.8]), client_request_id="order-2"),
               record("9e1b", "stable", binary_answer([0.3]))]
    log = write_log(tmp_path / "log.sqlite", records)
    labels = write_labels_csv(tmp_path / "labels.csv", [
        {"request_id": "order-1", "label": "yes"},   # the client's id; its shadow copy shares it: one request
        {"request_id": "77c0", "label": "no"},       # the proxy's id
        {"request_id": "9e1b", "label": "no"},
        {"request_id": "order-9", "label": "no"}])   # neither
    report = reporting.build_report(log, labels, "taxi", "stable", "canary:shadow", include_shadow=True,
                                    min_samples=1)
    assert report["labels_file"]["matched_requests"] == 3 and report["labels_file"]["unmatched_requests"] == 1
    assert report["variants"]["stable"]["labelled_rows"] == 2
    assert report["variants"]["stable"]["metrics"]["accuracy"] == 1.0  # 0.9 -> yes, 0.3 -> no
    assert report["variants"]["canary:shadow"]["metrics"]["accuracy"] == 0.0  # 0.2 -> no, labelled yes
    assert report["variants"]["canary"]["labelled_rows"] == 1
    assert report["comparison"]["paired"] and report["comparison"]["rows_a"] == 1


def test_a_client_request_id_on_several_requests_is_refused_naming_it(tmp_path, capsys):
    records = [record("a1", "stable", binary_answer([0.9]), client_request_id="retry-me"),
               record("a2", "canary", binary_answer([0.8]), client_request_id="retry-me", ts=T0 + 1),
               record("a3", "canary", binary_answer([0.8]), client_request_id="retry-me", ts=T0 + 2)]
    log = write_log(tmp_path / "log.sqlite", records)
    labels = write_labels_csv(tmp_path / "labels.csv", [{"request_id": "a1", "label": "yes"},
                                                        {"request_id": "retry-me", "label": "yes"}])
    code, err = _error(capsys, ["--log", log, "--labels", labels])
    assert code == 2
    assert f"labels file {labels} line 3: request_id 'retry-me' is the client's X-Request-Id of 3 requests" in err


def test_a_label_by_client_id_and_one_by_proxy_id_for_the_same_row_must_agree(tmp_path, capsys):
    log = write_log(tmp_path / "log.sqlite", [record("b1", "stable", binary_answer([0.9]), client_request_id="c1"),
                                              record("b2", "canary", binary_answer([0.9]))])
    labels = write_labels_csv(tmp_path / "labels.csv", [{"request_id": "b1", "label": "yes"},
                                                        {"request_id": "c1", "label": "no"}])
    code, err = _error(capsys, ["--log", log, "--labels", labels])
    assert code == 2 and ("request_id 'b1' (the client's 'c1') row 0 has two labels ('yes' at line 2, 'no' at line 3)"
                          in err)


def test_a_postgresql_log_gives_the_report_a_sqlite_log_gives(tmp_path, postgres_url):
    from tests.conftest import POSTGRES_PASSWORD

    a_records, a_labels, *_ = binary_traffic("stable", 300, 0.5, seed=21)
    b_records, b_labels, *_ = binary_traffic("canary", 300, 1.5, seed=22)
    junk = record("stable-junk", "stable", {"error": "JSON Parse error"}, status=400, request="{not json \x00")
    records = a_records + b_records + [junk]
    labels = write_labels_csv(tmp_path / "labels.csv", a_labels + b_labels)
    reports = [reporting.build_report(write_log(log, records), labels, None, "stable", "canary")
               for log in (tmp_path / "log.sqlite", postgres_url)]
    assert reports[1]["decision"]["outcome"] == "GO" and reports[1]["variants"]["stable"]["errors"] == 1
    assert reports[1]["log"] == logstore.masked_url(postgres_url) and POSTGRES_PASSWORD not in json.dumps(reports[1])
    assert {**reports[1], "log": None} == {**reports[0], "log": None}


# --- input errors -------------------------------------------------------------------------

@pytest.fixture
def small_log(tmp_path):
    records, labels, *_ = binary_traffic("stable", 5, 1.0, seed=14)
    records += binary_traffic("canary", 5, 1.0, seed=15)[0]
    return write_log(tmp_path / "log.sqlite", records), labels


def _error(capsys, argv):
    code = ab_report.main(argv)
    return code, capsys.readouterr().err


def test_labels_file_without_request_id_column(tmp_path, small_log, capsys):
    log, labels = small_log
    path = write_labels_csv(tmp_path / "bad.csv", [{"id": "x", "label": "yes"}], columns=("id", "label"))
    code, err = _error(capsys, ["--log", log, "--labels", path])
    assert code == 2 and f"labels file {path}: no 'request_id' column (columns: id, label)" in err


@pytest.mark.parametrize("rows, message", [
    ([{"request_id": "stable-0", "label": "maybe"}], "line 2: label 'maybe' is neither a class name (known: no=0, "
                                                     "yes=1) nor a class id 0..1"),
    ([{"request_id": "stable-0", "label": "7"}], "line 2: label '7' is neither"),
    ([{"request_id": "stable-0", "row": "first", "label": "yes"}], "line 2: row 'first' is not a non-negative integer"),
    ([{"request_id": "stable-0", "row": "-1", "label": "yes"}], "line 2: row '-1' is not a non-negative integer"),
    ([{"request_id": "stable-0", "row": "1.5", "label": "yes"}], "line 2: row '1.5' is not a non-negative integer"),
    ([{"request_id": "stable-0", "label": "yes"}, {"request_id": "stable-0", "label": "no"}],
     "request_id 'stable-0' row 0 has two labels ('yes' at line 2, 'no' at line 3)"),
    ([{"request_id": "", "label": "yes"}], "line 2: request_id must be a non-empty string"),
])
def test_malformed_csv_labels(tmp_path, small_log, capsys, rows, message):
    log, _ = small_log
    path = write_labels_csv(tmp_path / "bad.csv", rows)
    code, err = _error(capsys, ["--log", log, "--labels", path])
    assert code == 2 and message in err and path in err


def test_malformed_jsonl_labels(tmp_path, small_log, capsys):
    log, _ = small_log
    path = tmp_path / "bad.jsonl"
    path.write_text('{"request_id": "stable-0", "label": "yes"}\n{"request_id": "stable-1", "label": \n')
    code, err = _error(capsys, ["--log", log, "--labels", str(path)])
    assert code == 2 and f"labels file {path} line 2: not JSON" in err
    path.write_text('{"request": "stable-0", "label": "yes"}\n')
    code, err = _error(capsys, ["--log", log, "--labels", str(path)])
    assert code == 2 and "line 1: no 'request_id' field (fields: request, label)" in err
    code, err = _error(capsys, ["--log", log, "--labels", str(tmp_path / "missing.csv")])
    assert code == 2 and "missing.csv: no such file" in err


def test_unknown_variant_model_or_log(tmp_path, small_log, capsys):
    log, labels = small_log
    path = write_labels_csv(tmp_path / "labels.csv", labels)
    code, err = _error(capsys, ["--log", log, "--labels", path, "--b", "blue"])
    assert code == 2 and "--b 'blue': no such variant" in err and "variants present: canary (5 requests), " \
        "stable (5 requests)" in err
    code, err = _error(capsys, ["--log", log, "--labels", path, "--model", "penguin"])
    assert code == 2 and "no records of model 'penguin'" in err and "models present: taxi (10)" in err
    code, err = _error(capsys, ["--log", str(tmp_path / "none.sqlite"), "--labels", path])
    assert code == 2 and "none.sqlite: no such file" in err
    code, err = _error(capsys, ["--log", log, "--labels", path, "--primary", "rmse"])
    assert code == 2 and "--primary rmse: not a metric of a binary model" in err
    with pytest.raises(SystemExit) as exit_info:
        ab_report.main(["--log", log, "--start", "yesterday"])
    assert exit_info.value.code == 2


def test_variants_with_a_different_class_order_are_refused(tmp_path, capsys):
    flipped = {"predictions": [{"probabilities": [0.3, 0.7], "classes": "no", "class_ids": 1}]}
    records = [record("a", "stable", binary_answer([0.7])), record("b", "canary", flipped)]
    log = write_log(tmp_path / "log.sqlite", records)
    path = write_labels_csv(tmp_path / "l.csv", [{"request_id": "a", "label": "yes"}])
    code, err = _error(capsys, ["--log", log, "--labels", path])
    assert code == 2 and "class id 1 is 'no' in the answers of 'canary' but 'yes' in the answers of 'stable'" in err


# --- windows, other tasks, the command line -------------------------------------------------

def test_window_selects_records(tmp_path):
    early, early_labels, *_ = binary_traffic("stable", 300, 1.0, seed=16, prefix="early", ts=T0)
    late, late_labels, *_ = binary_traffic("stable", 300, 1.0, seed=17, prefix="late", ts=T0 + 7200)
    canary, canary_labels, *_ = binary_traffic("canary", 300, 1.0, seed=18, ts=T0 + 7200)
    log = write_log(tmp_path / "log.sqlite", early + late + canary)
    path = write_labels_csv(tmp_path / "l.csv", early_labels + late_labels + canary_labels)
    start, end = ab_report.window(None, T0 + 7200 + 600, 1.0)
    assert (start, end) == (T0 + 3600 + 600, T0 + 7800)
    report = reporting.build_report(log, path, None, "stable", "canary", start=start, end=end)
    assert report["variants"]["stable"]["requests"] == 300 and report["variants"]["canary"]["requests"] == 300
    assert report["labels_file"]["unmatched_requests"] == 300  # the early requests are outside the window
    assert ab_report.parse_time("2023-11-14T22:13:20Z") == T0 == ab_report.parse_time(str(T0))
    with pytest.raises(ab_report.InputError):
        ab_report.window(T0, T0 + 1, 1.0)


def test_regression_rmse_mae_and_welch(tmp_path):
    rng = np.random.default_rng(19)
    truth_a, truth_b = rng.normal(10, 3, 500), rng.normal(10, 3, 500)
    pred_a, pred_b = truth_a + rng.normal(0, 2.0, 500), truth_b + rng.normal(0, 1.0, 500)
    records = [record(f"a{i}", "stable", {"predictions": [float(p)]}) for i, p in enumerate(pred_a)]
    records += [record(f"b{i}", "canary", {"predictions": [{"value": [float(p)]}]}) for i, p in enumerate(pred_b)]
    labels = [{"request_id": f"a{i}", "label": repr(float(t))} for i, t in enumerate(truth_a)]
    labels += [{"request_id": f"b{i}", "label": float(t)} for i, t in enumerate(truth_b)]
    code, report = run(tmp_path, records, labels, labels_format="jsonl")
    assert report["task"] == "regression" and code == 0
    canary = report["variants"]["canary"]["metrics"]
    assert canary["rmse"] == pytest.approx(math.sqrt(np.mean((pred_b - truth_b) ** 2)))
    assert canary["mae"] == pytest.approx(np.mean(np.abs(pred_b - truth_b)))
    rmse = {c["metric"]: c for c in report["comparison"]["metrics"]}["rmse"]
    assert rmse["tested"] == "mean squared error" and rmse["method"] == "Welch t-test"
    # Welch's t with Welch-Satterthwaite degrees of freedom, from the formula
    sq_a, sq_b = (pred_a - truth_a) ** 2, (pred_b - truth_b) ** 2
    va, vb = sq_a.var(ddof=1) / 500, sq_b.var(ddof=1) / 500
    df = (va + vb) ** 2 / (va ** 2 / 499 + vb ** 2 / 499)
    t = (sq_b.mean() - sq_a.mean()) / math.sqrt(va + vb)
    assert rmse["estimate"] == pytest.approx(sq_b.mean() - sq_a.mean())
    assert rmse["p_value"] == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-6)
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert (rmse["ci_low"], rmse["ci_high"]) == pytest.approx((t * math.sqrt(va + vb) - half,
                                                               t * math.sqrt(va + vb) + half))
    # the relative margin on RMSE, in MSE units
    assert report["comparison"]["margin_tested"] == pytest.approx(np.mean(sq_a) * (1.01 ** 2 - 1))


def test_multiclass_accuracy_and_log_loss(tmp_path):
    rng = np.random.default_rng(20)
    names = ["red", "green", "blue"]
    records, labels, truth, probs = [], [], {"stable": [], "canary": []}, {"stable": [], "canary": []}
    for variant, sharpness in (("stable", 1.0), ("canary", 1.0)):
        for i in range(300):
            label = int(rng.integers(3))
            logits = rng.normal(size=3)
            logits[label] += sharpness
            p = np.exp(logits) / np.exp(logits).sum()
            answer = {"predictions": [{"probabilities": p.tolist(), "classes": names[int(p.argmax())],
                                       "class_ids": int(p.argmax())}]}
            records.append(record(f"{variant}{i}", variant, answer))
            labels.append({"request_id": f"{variant}{i}", "label": names[label]})
            truth[variant].append(label)
            probs[variant].append(p)
    code, report = run(tmp_path, records, labels)
    assert report["task"] == "multiclass" and report["comparison"]["primary"] == "accuracy"
    assert report["classes"] == names
    for variant in ("stable", "canary"):
        metrics = report["variants"][variant]["metrics"]
        p, y = np.array(probs[variant]), np.array(truth[variant])
        assert metrics["accuracy"] == pytest.approx(np.mean(p.argmax(axis=1) == y))
        assert metrics["log_loss"] == pytest.approx(sklearn_log_loss(y, p, labels=[0, 1, 2]))
    accuracy = report["comparison"]["metrics"][0]
    assert accuracy["method"] == "two-proportion z-test, Newcombe CI" and not accuracy["significant"]


def test_command_line_exit_code(tmp_path):
    a_records, a_labels, *_ = binary_traffic("stable", 300, 1.5, seed=21)
    b_records, b_labels, *_ = binary_traffic("canary", 300, 0.2, seed=22)
    log = write_log(tmp_path / "log.sqlite", a_records + b_records)
    path = write_labels_csv(tmp_path / "l.csv", a_labels + b_labels)
    done = subprocess.run([sys.executable, "-m", "ops.ab_report", "--log", log, "--labels", path],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "Decision: NO-GO (exit code 1)" in done.stdout


# --- the statistics against independent computations ----------------------------------------

def _brute_force_placements(y, score):
    positives, negatives = score[y == 1], score[y == 0]
    psi = (positives[:, None] > negatives[None, :]) + 0.5 * (positives[:, None] == negatives[None, :])
    return psi.mean(axis=1), psi.mean(axis=0)


def test_auc_and_delong_match_brute_force():
    rng = np.random.default_rng(23)
    y = (rng.random(120) < 0.35).astype(int)
    score_a = np.round(rng.random(120) + 0.3 * y, 1)  # rounded: many ties
    score_b = np.round(rng.random(120) + 0.6 * y, 1)
    assert statistics.auc(y, score_a) == pytest.approx(roc_auc_score(y, score_a))
    assert statistics.auc(np.zeros(5), score_a[:5]) is None
    (v10a, v01a), (v10b, v01b) = _brute_force_placements(y, score_a), _brute_force_placements(y, score_b)
    got10, got01 = statistics.delong_placements(y, score_a)
    np.testing.assert_allclose(got10, v10a)
    np.testing.assert_allclose(got01, v01a)
    m, n = len(v10a), len(v01a)
    # paired: DeLong, DeLong & Clarke-Pearson (1988), variance of the difference from the covariances
    var_a = np.var(v10a, ddof=1) / m + np.var(v01a, ddof=1) / n
    var_b = np.var(v10b, ddof=1) / m + np.var(v01b, ddof=1) / n
    cov = (np.sum((v10a - v10a.mean()) * (v10b - v10b.mean())) / (m - 1) / m
           + np.sum((v01a - v01a.mean()) * (v01b - v01b.mean())) / (n - 1) / n)
    diff = roc_auc_score(y, score_b) - roc_auc_score(y, score_a)
    z = diff / math.sqrt(var_a + var_b - 2 * cov)
    paired = statistics.delong_paired_test(y, score_a, score_b, 0.05)
    assert paired.estimate == pytest.approx(diff)
    assert paired.p_value == pytest.approx(2 * (1 - stats.norm.cdf(abs(z))))
    assert paired.ci_high - paired.ci_low == pytest.approx(2 * 1.959963985 * math.sqrt(var_a + var_b - 2 * cov))
    independent = statistics.delong_test(y, score_a, y, score_b, 0.05)
    assert independent.p_value == pytest.approx(2 * (1 - stats.norm.cdf(abs(diff / math.sqrt(var_a + var_b)))))
    with pytest.raises(statistics.NotTestable):
        statistics.delong_placements(np.array([1, 0, 0]), np.array([0.5, 0.2, 0.1]))


def test_two_proportion_test_matches_chi_square_and_newcombe():
    result = statistics.two_proportion_test(48, 80, 56, 70, 0.05)
    chi2 = stats.chi2_contingency([[56, 14], [48, 32]], correction=False)
    assert result.p_value == pytest.approx(chi2.pvalue)
    assert result.estimate == pytest.approx(0.2)
    # Newcombe (1998), Statistics in Medicine 17:873, table II example (a), 56/70 - 48/80, method 10
    assert (result.ci_low, result.ci_high) == pytest.approx((0.0524, 0.3339), abs=5e-5)


def test_mcnemar_matches_the_exact_binomial():
    correct_a = np.array([1] * 50 + [0] * 12 + [1] * 3 + [0] * 35, dtype=bool)
    correct_b = np.array([1] * 50 + [1] * 12 + [0] * 3 + [0] * 35, dtype=bool)
    result = statistics.mcnemar_test(correct_a, correct_b, 0.05)
    two_sided = 2 * sum(math.comb(15, k) for k in range(0, 4)) / 2 ** 15
    assert result.p_value == pytest.approx(two_sided)
    assert result.estimate == pytest.approx(9 / 100)
    se = math.sqrt(15 - 81 / 100) / 100
    assert (result.ci_low, result.ci_high) == pytest.approx((0.09 - 1.959963985 * se, 0.09 + 1.959963985 * se))
    same = statistics.mcnemar_test(correct_a, correct_a, 0.05)
    assert (same.estimate, same.p_value, same.ci_low, same.ci_high) == (0.0, 1.0, 0.0, 0.0)


def _sample(y, predicted, probabilities=None):
    keys = [("r", i) for i in range(len(y))]
    return statistics.Sample(keys, np.asarray(y), np.asarray(predicted),
                             None if probabilities is None else np.asarray(probabilities, dtype=np.float64))


def test_library_metrics_are_the_means_the_tests_test():
    # scikit-learn computes the values shown; the t-tests test the mean of row_losses: the two must agree,
    # a probability of exactly 0 for the true class (clipped alike) included
    y = np.array([0, 1, 1, 0, 1])
    probabilities = [[0.9, 0.1], [0.2, 0.8], [1.0, 0.0], [0.5, 0.5], [0.3, 0.7]]
    sample = _sample(y, np.argmax(probabilities, axis=1), probabilities)
    for metric in ("accuracy", "log_loss"):
        assert statistics.metric_value(sample, metric) == pytest.approx(statistics.row_losses(sample, metric).mean())
    assert statistics.metric_value(sample, "log_loss") > 7  # the clipped zero dominates: -log(eps) / 5
    regression = _sample(np.array([1.0, 2.0, 4.0]), np.array([1.5, 2.0, 2.0]))
    assert statistics.metric_value(regression, "mae") == pytest.approx(statistics.row_losses(regression, "mae").mean())
    assert statistics.metric_value(regression, "rmse") == pytest.approx(
        math.sqrt(statistics.row_losses(regression, "rmse").mean()))


def test_auc_with_ties_counts_one_half():
    y = np.array([1, 0, 1, 0])
    score = np.array([0.5, 0.5, 0.5, 0.5])  # every pair tied
    assert statistics.auc(y, score) == 0.5
    assert statistics.auc(y, np.array([0.9, 0.5, 0.5, 0.1])) == pytest.approx((1 + 1 + 0.5 + 1) / 4)


def test_a_class_absent_is_undefined_or_not_testable_never_a_division_by_zero():
    only_negatives = _sample(np.zeros(6, dtype=int), np.zeros(6, dtype=int), [[0.8, 0.2]] * 6)
    assert statistics.metric_value(only_negatives, "auc") is None
    # log loss stays defined: every class is named to scikit-learn, which would refuse a single label otherwise
    assert statistics.metric_value(only_negatives, "log_loss") == pytest.approx(-math.log(0.8))
    entry = reporting.compare_metric("auc", only_negatives, only_negatives, True, 0.05)
    assert entry["a"] is None and "estimate" not in entry
    assert "at least two rows of each class (positives 0, negatives 6)" in entry["not_testable"]
    # every row right in both variants: nothing to test (the chi-square table has an empty column)
    everything_right = statistics.two_proportion_test(30, 30, 40, 40, 0.05)
    assert everything_right.estimate == 0 and everything_right.p_value == 1.0
    assert everything_right.ci_low < 0 < everything_right.ci_high


def test_decision_rule_branches():
    errors = {"a_rate": 0.0, "b_rate": 0.0, "p_value": 1.0}

    def entry(estimate, low, high, p, higher_is_better=True):
        return {"metric": "auc" if higher_is_better else "log_loss", "a": 0.8, "b": 0.8 + estimate,
                "tested": "AUC", "estimate": estimate, "ci_low": low, "ci_high": high, "p_value": p,
                "significant": p < 0.05, "higher_is_better": higher_is_better}

    def decide(primary, guards=(), errors=errors, n=(500, 500), paired=False):
        return reporting.decide(primary, list(guards), errors, n, paired, 0.05, 0.01, 200)

    assert decide(entry(0.02, 0.01, 0.03, 0.001))[0] == "GO"
    assert decide(entry(-0.02, -0.03, -0.01, 0.001))[0] == "NO-GO"
    assert decide(entry(0.0, -0.008, 0.008, 0.9))[0] == "GO"
    outcome, reasons = decide(entry(0.0, -0.02, 0.02, 0.9))
    assert outcome == "NOT ENOUGH DATA" and "2,000 labelled rows per variant" in reasons[1]  # (0.02 / 0.01)^2 x 500
    outcome, reasons = decide(entry(0.0, -0.02, 0.02, 0.9), n=(300, 300), paired=True)
    assert outcome == "NOT ENOUGH DATA" and "1,200 labelled rows in pairs" in reasons[1]
    assert decide(entry(0.0, -0.02, 0.02, 0.9), n=(150, 150), paired=True)[1] == [
        "150 labelled rows answered by both A and B; at least 200 needed"]
    # lower is better: a log loss up by 0.02 is a loss
    assert decide(entry(0.02, 0.01, 0.03, 0.001, False))[0] == "NO-GO"
    assert decide(entry(-0.02, -0.03, -0.01, 0.001, False))[0] == "GO"
    assert decide(entry(0.02, 0.01, 0.03, 0.001), n=(500, 150))[0] == "NOT ENOUGH DATA"
    assert decide(None, errors={"a_rate": 0.0, "b_rate": 0.1, "p_value": 0.001}, n=(0, 0))[0] == "NO-GO"
    assert decide(entry(0.02, 0.01, 0.03, 0.001), errors={"a_rate": 0.1, "b_rate": 0.0, "p_value": 0.001})[0] == "GO"
    # guardrails: a loss counts at alpha / number of guardrails; a gain never blocks
    two_guards = [entry(-0.02, -0.04, -0.001, 0.03), entry(0.01, 0.0, 0.02, 0.04)]
    assert decide(entry(0.02, 0.01, 0.03, 0.001), two_guards)[0] == "GO"  # 0.03 > 0.05 / 2
    two_guards[0]["p_value"] = 0.02
    assert decide(entry(0.02, 0.01, 0.03, 0.001), two_guards)[0] == "NO-GO"
    assert decide(entry(0.02, 0.01, 0.03, 0.001), [entry(0.02, 0.01, 0.03, 1e-9)])[0] == "GO"


# --- reading answers back: one rule (serving/wire.answer_rows) for the report and the proxy ---

@pytest.mark.parametrize("answer,api,rows", [
    ({"predictions": [{"score": 0.2}, {"score": 0.9}]}, "predict", [{"score": 0.2}, {"score": 0.9}]),
    # columnar :predict (json_tensor.cc MakeJsonFromTensors, columnar format): one list per output
    ({"outputs": {"score": [0.2, 0.9], "classes": ["no", "yes"]}}, "predict",
     [{"score": 0.2, "classes": "no"}, {"score": 0.9, "classes": "yes"}]),
    ({"outputs": [0.2, 0.9]}, "predict", [0.2, 0.9]),     # a single unnamed output: the bare list
    ({"outputs": 0.7}, "predict", [0.7]),                 # ...or a bare value
    ({"results": [[["no", 0.8], ["yes", 0.2]]]}, "classify", [[["no", 0.8], ["yes", 0.2]]]),
    ({"results": [1.5]}, "regress", [1.5]),
    ({"results": [1.5]}, "predict", None),                # :predict never answers with results
    ({"predictions": [1]}, "classify", None),
    ({"results": [1.5]}, None, [1.5]),                     # api unknown: whichever key is there
    ({"outputs": {"a": [1], "b": 2}}, "predict", None),   # not columns of equal kind: unreadable
    ({"error": "x"}, None, None),
    ([1, 2], None, None),
])
def test_answer_rows_reads_every_answer_format_tf_serving_writes(answer, api, rows):
    from serving import wire

    assert wire.answer_rows(answer, api) == rows


def test_the_report_and_the_proxy_read_a_columnar_answer_alike():
    from serving import proxy

    answer = {"outputs": {"classes": [["yes"], ["no"]], "probabilities": [[0.1, 0.9], [0.7, 0.3]]}}
    rows = reporting.parse_outputs(answer)
    assert [r.class_id for r in rows] == [1, 0]
    assert proxy.shadow_outcome("predict", answer, {"predictions": [{"classes": ["yes"]}, {"classes": ["no"]}]}) \
        == "same_class"
