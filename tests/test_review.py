"""The release review page (ops/review.py).

Fast tests here cover how the review lines up metrics and finds the A/B and parity reports; the
page itself is checked against real pipeline runs (a candidate and a stable version) in
headless Chromium by check_review_of_real_runs, which tests/test_pipeline_e2e.py calls with its
session's runs so that no extra pipeline run is started.
"""

import json
import os
import re

import pytest

from ops import review


def _metric(value, lower=None, upper=None):
    return {"value": value, "lower": lower, "upper": upper}


def test_metrics_line_up_by_slice_largest_first_with_candidate_minus_stable():
    candidate = {"Overall": {"auc": _metric(0.95, 0.94, 0.96), "example_count": _metric(1000.0)},
                 "payment_type=Cash": {"auc": _metric(0.70), "example_count": _metric(300.0)},
                 "payment_type=Credit Card": {"auc": _metric(0.66), "example_count": _metric(600.0)}}
    stable = {"Overall": {"auc": _metric(0.93), "example_count": _metric(900.0)},
              "payment_type=Credit Card": {"auc": _metric(0.67), "example_count": _metric(500.0)}}
    rows = review.compare_metrics(candidate, stable)
    assert [(r["slice"], r["metric"]) for r in rows if r["metric"] == "auc"] == [
        ("Overall", "auc"), ("payment_type=Credit Card", "auc"), ("payment_type=Cash", "auc")]
    by_key = {(r["slice"], r["metric"]): r for r in rows}
    assert by_key[("Overall", "auc")]["delta"] == pytest.approx(0.02)
    assert by_key[("Overall", "auc")]["candidate"]["lower"] == 0.94
    assert by_key[("payment_type=Credit Card", "auc")]["delta"] == pytest.approx(-0.01)
    cash = by_key[("payment_type=Cash", "auc")]
    assert cash["stable"] is None and cash["delta"] is None  # a slice the stable version never saw
    assert all(r["stable"] is None and r["delta"] is None for r in review.compare_metrics(candidate, None))


def _ab_report_file(tmp_path, stable_version, canary_version):
    """A real `make ab-report` JSON over a synthetic log where 'canary' answered with canary_version."""
    from ops import ab_report
    from tests.test_ab_report import binary_traffic, write_labels_csv, write_log

    a_records, a_labels, _, _ = binary_traffic("stable", 300, 0.5, seed=1)
    b_records, b_labels, _, _ = binary_traffic("canary", 300, 1.5, seed=2)
    for r in a_records:
        r["model_version"] = stable_version
    for r in b_records:
        r["model_version"] = canary_version
    log = write_log(tmp_path / "log.sqlite", a_records + b_records)
    labels = write_labels_csv(tmp_path / "labels.csv", a_labels + b_labels)
    out = tmp_path / "ab_report.json"
    ab_report.main(["--log", log, "--labels", labels, "--json", str(out)])
    return str(out)


def test_the_ab_report_is_shown_only_when_the_candidate_answered_in_it(tmp_path):
    path = _ab_report_file(tmp_path, stable_version=1, canary_version=2)
    found = review.ab_evidence(path, "taxi", 2)
    assert found["found"] and found["candidate_variants"] == ["canary"]
    assert found["report"]["decision"]["outcome"] == "GO"
    other = review.ab_evidence(path, "taxi", 3)
    assert not other["found"] and "not about version 3" in other["note"] and "canary: 2" in other["note"]
    absent = review.ab_evidence(str(tmp_path / "none.json"), "taxi", 2)
    assert not absent["found"] and "make ab-report" in absent["note"]
    (tmp_path / "bad.json").write_text('{"decision": {}}')
    with pytest.raises(review.ReviewError, match=r"--ab_report .*bad.json: not an A/B report"):
        review.ab_evidence(str(tmp_path / "bad.json"), "taxi", 2)


def test_a_parity_report_of_another_version_is_not_taken_for_the_candidate(tmp_path):
    path = tmp_path / "parity.json"
    path.write_text(json.dumps({"model": "taxi", "version": 4, "rows": 10, "paths": {}}))
    assert review.parity_evidence(str(path), "taxi", 4)["found"]
    other = review.parity_evidence(str(path), "taxi", 5)
    assert not other["found"] and "checked version 4" in other["note"] and "make parity VERSION=5" in other["note"]
    path.write_text("[]")
    with pytest.raises(review.ReviewError, match="--parity .*parity.json: not a report of `make parity`"):
        review.parity_evidence(str(path), "taxi", 5)


def test_the_command_line_names_a_missing_store_and_exits_2(tmp_path, capsys):
    code = review.main(["--version", "3", "--metadata", str(tmp_path / "none.sqlite"),
                        "--model_repository", str(tmp_path), "--out_dir", str(tmp_path / "reports")])
    assert code == review.INPUT_ERROR_EXIT
    assert "--metadata: no ML Metadata store at" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "reports")


# --- against real runs (called from tests/test_pipeline_e2e.py) -------------------------------

def _repository_with(tmp, source_repo, versions, stable=None):
    """A model repository of its own (links to the pushed version folders), with `stable` promoted
    by ops.release when given: the review's view, whatever the release tests do to the shared one."""
    from ops import release

    repo = os.path.join(tmp, f"review_repository_{stable}")
    os.makedirs(os.path.join(repo, "taxi"), exist_ok=True)
    for v in versions:
        link = os.path.join(repo, "taxi", str(v))
        if not os.path.exists(link):
            os.symlink(os.path.join(source_repo, "taxi", str(v)), link)
    if stable is not None and not release.read_labels(repo, "taxi"):
        release.promote(repo, os.path.join(tmp, "metadata", "taxi.sqlite"), "taxi", stable, who="reviewer")
    return repo


def check_review_of_real_runs(tmp, first, candidate_run, spec, parity_path):
    """The review of the candidate run's version beside the first run's, as data and in Chromium;
    parity_path: the report `make parity` wrote for the candidate's version."""
    from tests import browser

    metadata = os.path.join(tmp, "metadata", "taxi.sqlite")
    stable_v, candidate_v = int(first["model_version"]), int(candidate_run["model_version"])
    assert candidate_v > stable_v
    out_dir = os.path.join(tmp, "review_reports")

    # Before the first release: no stable, and the page says so.
    repo = _repository_with(tmp, os.path.join(tmp, "models"), [stable_v, candidate_v])
    alone = review.gather("taxi", stable_v, spec, repo, metadata, ab_report=os.path.join(tmp, "none.json"),
                          parity=parity_path)
    assert alone["stable"] is None and alone["drift"] is None and alone["stable_version"] is None
    # The candidate's parity report is not taken for the other version's.
    assert not alone["parity"]["found"] and f"checked version {candidate_v} " in alone["parity"]["note"]
    alone_page = review.write(alone, out_dir)["html"]

    repo = _repository_with(tmp, os.path.join(tmp, "models"), [stable_v, candidate_v], stable=stable_v)
    ab_path = _ab_report_file(_fresh(tmp, "ab"), stable_version=stable_v, canary_version=candidate_v)
    data = review.gather("taxi", candidate_v, spec, repo, metadata, ab_report=ab_path, parity=parity_path)
    candidate, stable = data["candidate"], data["stable"]
    assert stable["version"] == stable_v and candidate["version"] == candidate_v
    assert data["stable_release"]["who"] == "reviewer" and data["stable_release"]["action"] == "promote"
    # Metrics are each version's own Evaluator output, found by lineage.
    assert candidate["lineage"]["model"] == candidate_run["artifacts"]["model"]
    assert stable["lineage"]["model"] == first["artifacts"]["model"]
    overall = {r["metric"]: r for r in data["metrics"] if r["slice"] == "Overall"}
    assert overall["auc"]["candidate"]["value"] == pytest.approx(candidate_run["metrics"]["overall"]["auc"])
    assert overall["auc"]["stable"]["value"] == pytest.approx(first["metrics"]["overall"]["auc"])
    assert overall["auc"]["delta"] == pytest.approx(candidate_run["metrics"]["overall"]["auc"]
                                                    - first["metrics"]["overall"]["auc"])
    assert data["metrics"][0]["slice"] == "Overall" and any(r["slice"].startswith("payment_type=") for r in data["metrics"])
    accuracy = overall["binary_accuracy"]["candidate"]
    assert accuracy["lower"] < accuracy["value"] < accuracy["upper"]  # the Evaluator output's interval
    # The like-for-like figure: the Evaluator's change against its baseline on the candidate's rows,
    # the same number the candidate run's summary judged the change threshold on.
    auc_change = next(v for v in candidate_run["thresholds"] if v["name"] == "auc" and v["kind"] == "change")
    assert overall["auc"]["evaluator_diff"] == pytest.approx(auc_change["value"])
    assert [v["passed"] for v in candidate["blessing"]["verdicts"]] == [True] * len(candidate_run["thresholds"])
    # The Evaluator compared the candidate with the first run's model, the stable one.
    assert data["baseline_is_stable"] and candidate["blessing"]["blessed"] and candidate["blessing"]["failures"] == []
    # Different rows were trained on: the drift comparison ran on every compared feature.
    drift = data["drift"]
    assert not drift["same_examples"] and drift["bounds"] == {"infinity_norm": 0.1, "jensen_shannon_divergence": 0.25}
    compared = {m["feature"]: m for m in drift["features"]}
    assert compared["payment_type"]["comparator"] == "L_INFTY" and compared["fare"]["comparator"] == "JENSEN_SHANNON_DIVERGENCE"
    assert all(0 <= m["value"] <= 1 for m in drift["features"])
    # The sandbox report and the warmup file of each version.
    assert candidate["sandbox"] == candidate_run["sandbox"] and stable["sandbox"] == first["sandbox"]
    assert candidate["warmup"]["present"] and candidate["warmup"]["records"] == candidate_run["sandbox"]["warmup_records"]
    assert candidate["lineage"]["code_commit"] and candidate["lineage"]["data"]
    assert data["ab"]["found"] and data["ab"]["candidate_variants"] == ["canary"]
    with open(parity_path) as f:
        parity = json.load(f)
    assert data["parity"]["found"] and data["parity"]["report"] == parity
    assert data["promote_command"] == f"make promote VERSION={candidate_v} LABEL=stable"
    # The command line `make review VERSION=n` runs writes the same page.
    assert review.main(["--version", str(candidate_v), "--model_repository", repo, "--metadata", metadata,
                        "--ab_report", ab_path, "--parity", parity_path,
                        "--out_dir", out_dir, "--spec", spec.source]) == 0
    paths = {"html": review.page_path(out_dir, "taxi", candidate_v)}
    with open(paths["html"][:-len(".html")] + ".json") as f:
        assert json.load(f)["metrics"] == json.loads(json.dumps(data["metrics"]))
    with pytest.raises(review.ReviewError, match=r"version 42 of 'taxi' was never pushed after a blessing.*"
                                                 rf"pushed versions of 'taxi': {stable_v}, {candidate_v}"):
        review.gather("taxi", 42, spec, repo, metadata)

    rendered = browser.render(paths["html"], "review_taxi_candidate_vs_stable")
    assert rendered.requests == []
    text = rendered.dom
    assert f"Release review: taxi version {candidate_v}" in text
    assert f"candidate v{candidate_v}" in text and f"stable v{stable_v}" in text and "promote by reviewer" in text
    assert f"{overall['auc']['candidate']['value']:.4f}" in text and f"{overall['auc']['stable']['value']:.4f}" in text
    assert f"{overall['auc']['delta']:+.4f}" in text and f"{overall['auc']['evaluator_diff']:+.4f}" in text
    assert f"[{accuracy['lower']:.4f}, {accuracy['upper']:.4f}]" in text
    assert f"make promote VERSION={candidate_v} LABEL=stable" in text
    assert "payment_type" in text and "GO" in text and f"{candidate['sandbox']['p50_ms']:.4f}" in text
    assert browser.ink_pixels(rendered.screenshot) > 10_000
    # The parity section shows the real report's figures: its rows, and each path's largest difference
    # (parsed back: a 1e-7 difference printed as 0.0000 would hide the figure) and rows over tolerance.
    section = re.search(r'<section id="parity">(.*?)</section>', text, re.S).group(1)
    assert f"{parity['rows']} rows" in section and f"{parity['training_path_unmatched_rows']} unmatched" in section
    shown = {r["cells"][0]: r["cells"][1:] for r in browser.table_rows(text, "parity")}
    assert set(shown) == set(parity["paths"])
    for name, figures in parity["paths"].items():
        assert float(shown[name][0]) == pytest.approx(figures["max_abs_diff"], rel=0.01, abs=1e-12), name
        assert int(shown[name][1]) == figures["rows_over_tolerance"], name

    with open(alone_page) as f:  # the same page code, so one Chromium run above is enough
        alone_html = f.read()
    assert "no version is labelled &#39;stable&#39; yet" in alone_html and f"candidate v{stable_v}" in alone_html
    assert f"make promote VERSION={stable_v} LABEL=stable" in alone_html and "delta" not in alone_html
    assert f"checked version {candidate_v} of &#39;taxi&#39;, not version {stable_v}" in alone_html


def _fresh(tmp, name):
    import pathlib

    folder = pathlib.Path(tmp) / name
    folder.mkdir(exist_ok=True)
    return folder
