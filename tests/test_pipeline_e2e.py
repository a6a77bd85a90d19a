"""End-to-end LocalDagRunner runs on taxi samples (slow): a blessed push, and the data gate."""

import contextlib
import json
import os
import re
import sqlite3
import sys

import pytest
import yaml

from tests.conftest import CONSOLE_NOISE, REPO, TAXI_SPEC, component_lines, read_rows, taxi_csv_path, write_sample

pytestmark = pytest.mark.slow


def _env(tmp, name="env.yaml", sandbox=None):
    env = {"pipeline_root": f"{tmp}/pipelines/{{name}}", "metadata_path": f"{tmp}/metadata/{{name}}.sqlite",
           "model_repository": f"{tmp}/models", "enable_cache": True,
           "beam_args": ["--direct_running_mode=in_memory", "--direct_num_workers=1"],
           # Loose enough for a loaded 2-core machine; the refusal test tightens one of them.
           "sandbox": {"rows": 300, "latency_requests": 100, "throughput_seconds": 1, "max_p50_ms": 200,
                       "max_p99_ms": 2000, "min_requests_per_second": 5, "warmup_records": 50, **(sandbox or {})}}
    path = os.path.join(tmp, name)
    with open(path, "w") as f:
        yaml.safe_dump(env, f)
    return path


def _sample_spec(tmp, edit=None):
    """taxi.yaml with a schedule that takes enough steps on a sample (same schema and gates)."""
    with open(TAXI_SPEC) as f:
        raw = yaml.safe_load(f)
    raw["schema"] = os.path.join(REPO, raw["schema"])
    raw["training"]["schedule"] = [{"learning_rate": 0.003, "batch_size": 64, "epochs": 4},
                                   {"learning_rate": 0.001, "batch_size": 256, "epochs": 2}]
    if edit:
        edit(raw)
    path = os.path.join(tmp, "taxi_sample.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return path


def _run(tmp, data_dir, sandbox=None, edit=None, **kwargs):
    from pipelines import local_runner

    return local_runner.run(_sample_spec(tmp, edit), env_path=_env(tmp, sandbox=sandbox), data_path=data_dir, quiet=True,
                            summary_path=os.path.join(tmp, "run_summary.json"),
                            report_dir=os.path.join(tmp, "reports"), **kwargs)


def _executed_nodes(tmp):
    with sqlite3.connect(os.path.join(tmp, "metadata", "taxi.sqlite")) as db:
        return {row[0].split(".", 1)[1] for row in db.execute("SELECT name FROM Context WHERE type_id = "
                                                               "(SELECT id FROM Type WHERE name = 'node')")
                if db.execute("SELECT COUNT(*) FROM Association a JOIN Context c ON a.context_id = c.id "
                              "WHERE c.name = ?", (row[0],)).fetchone()[0]}


@pytest.fixture(scope="module")
def pipeline_run(taxi_spec, tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("e2e"))
    data = os.path.join(tmp, "data")
    write_sample(read_rows(taxi_csv_path(taxi_spec), limit=5000), data)
    first = _run(tmp, data)
    second = _run(tmp, data)
    return tmp, first, second


def _last_states(tmp):
    """{node id: MLMD state of its latest execution} in the run's metadata store."""
    from pipelines import mlmd

    return mlmd.latest_node_states(os.path.join(tmp, "metadata", "taxi.sqlite"))


def _lower_thresholds(raw):
    raw["thresholds"] = {"AUC": {"lower": 0.85, "change": -0.01}, "BinaryAccuracy": {"lower": 0.8, "change": -0.01}}


@pytest.fixture(scope="module")
def sandbox_refused_run(pipeline_run):
    """The same data with lower thresholds only, and a p50 latency no server meets: Transform and
    Trainer come from the cache (they never see thresholds), the Evaluator and what follows rerun."""
    tmp = pipeline_run[0]
    summary = _run(tmp, os.path.join(tmp, "data"), sandbox={"max_p50_ms": 0.001}, edit=_lower_thresholds)
    return summary, _last_states(tmp)


@contextlib.contextmanager
def _terminal(path):
    """Standard output (file descriptor 1 and sys.stdout) into `path` while the block runs: what a
    terminal shows of a run. local_runner's Console writes progress to a copy of descriptor 1 and
    print_summary() uses print(); pytest's capture of either is not reachable from a module fixture."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 1)
        try:
            with contextlib.redirect_stdout(f):
                yield
        finally:
            f.flush()
            os.dup2(saved, 1)
            os.close(saved)


def _rerun_on_a_copy(pipeline_run, tmp_path_factory, name, edit, quiet=True):
    """The first run's data and spec with `edit`, on a copy of its metadata store and model
    repository, so that whatever this run records or pushes reaches no other test. Of the nodes'
    parameters (their cache keys) only Pusher's name those paths (its destination), and it reruns
    anyway. Returns (summary, {node: latest state}, the copy's folder, the console's text or None)."""
    import shutil

    from pipelines import local_runner

    tmp, copy = pipeline_run[0], str(tmp_path_factory.mktemp(name))
    os.makedirs(os.path.join(copy, "metadata"))
    shutil.copy2(os.path.join(tmp, "metadata", "taxi.sqlite"), os.path.join(copy, "metadata", "taxi.sqlite"))
    shutil.copytree(os.path.join(tmp, "models"), os.path.join(copy, "models"), symlinks=True)
    console = os.path.join(copy, "console.txt")
    with contextlib.nullcontext() if quiet else _terminal(console):
        # The spec stays at the first run's path: Transform, data_gate and Trainer take that path as a parameter.
        summary = local_runner.run(_sample_spec(tmp, edit), env_path=_env(copy), data_path=os.path.join(tmp, "data"),
                                   quiet=quiet, summary_path=os.path.join(copy, "run_summary.json"),
                                   report_dir=os.path.join(copy, "reports"))
    if quiet:
        return summary, _last_states(copy), copy, None
    with open(console) as f:
        return summary, _last_states(copy), copy, f.read()


# No model on a taxi sample reaches this AUC: the run that asks for it is refused its blessing.
UNREACHABLE_AUC = 0.999


@pytest.fixture(scope="module")
def thresholds_only_run(pipeline_run, tmp_path_factory):
    """Other thresholds only (none of the runs here used them), one of them out of every model's
    reach, with the console kept as a terminal would show it."""
    edit = lambda raw: raw.update(thresholds={"AUC": {"lower": UNREACHABLE_AUC, "change": -0.02},  # noqa: E731
                                              "BinaryAccuracy": {"lower": 0.75, "change": -0.02}})
    return _rerun_on_a_copy(pipeline_run, tmp_path_factory, "thresholds_only", edit, quiet=False)


@pytest.fixture(scope="module")
def slices_only_run(pipeline_run, tmp_path_factory):
    """Other slices only: trip_start_month in place of trip_start_day."""
    edit = lambda raw: raw.update(slices=[["payment_type"], ["trip_start_month"]])  # noqa: E731
    return _rerun_on_a_copy(pipeline_run, tmp_path_factory, "slices_only", edit)


@pytest.fixture(scope="module")
def changed_data_run(pipeline_run, taxi_spec):
    """A third run on other rows: a new candidate, judged against the first run's model."""
    tmp = pipeline_run[0]
    data = os.path.join(tmp, "data")
    write_sample(read_rows(taxi_csv_path(taxi_spec))[5000:9000], data)
    return _run(tmp, data)


@pytest.mark.xdist_group("e2e")
def test_run_blesses_and_pushes_a_servable_model(pipeline_run):
    import tensorflow as tf

    tmp, summary, _ = pipeline_run
    assert summary["succeeded"] and summary["blessed"] and summary["pushed"]
    version = summary["model_version"]
    assert version.isdigit()
    assert os.path.normpath(summary["model_path"]) == os.path.join(tmp, "models", "taxi", version)
    assert os.listdir(os.path.join(tmp, "models", "taxi")) == [version]  # TF Serving layout
    model = tf.saved_model.load(summary["model_path"])
    assert {"serving_default", "serving_tf_example", "transform_features"} <= set(model.signatures)
    out = model.signatures["serving_default"](**{
        "fare": tf.constant([12.5]), "trip_miles": tf.constant([2.0]), "trip_seconds": tf.constant([600.0], tf.float64),
        "trip_start_hour": tf.constant([19.0], tf.float64), "trip_start_day": tf.constant([6.0], tf.float64),
        "trip_start_month": tf.constant([5.0], tf.float64),
        "trip_start_timestamp": tf.constant([1400269500.0], tf.float64),
        "payment_type": tf.constant(["Credit Card"]), "company": tf.constant([""]),
        **{k: tf.constant([float("nan")], tf.float64) for k in (
            "pickup_community_area", "dropoff_community_area", "pickup_census_tract", "dropoff_census_tract")},
        **{k: tf.constant([float("nan")]) for k in (
            "pickup_latitude", "pickup_longitude", "dropoff_latitude", "dropoff_longitude")}})
    assert out["probabilities"].shape == (1, 2) and out["classes"].numpy()[0] in (b"no", b"yes")
    # Sandbox validation served it in its own process before the push; the pushed copy is warmed.
    sandbox = summary["sandbox"]
    assert sandbox["blessed"] and sandbox["reasons"] == []
    assert sandbox["rows_compared"] == 300 and sandbox["rows_differing"] == 0
    assert 0 < sandbox["p50_ms"] <= sandbox["p99_ms"] and sandbox["requests_per_second"] > 5
    warmup = os.path.join(summary["model_path"], "assets.extra", "tf_serving_warmup_requests")
    assert sum(1 for _ in tf.data.TFRecordDataset(warmup)) == sandbox["warmup_records"] == 50


@pytest.mark.xdist_group("e2e")
def test_summary_reports_metrics_slices_and_timings(pipeline_run):
    tmp, summary, _ = pipeline_run
    with open(os.path.join(tmp, "run_summary.json")) as f:
        on_disk = json.load(f)
    assert on_disk["pipeline_name"] == "taxi" and on_disk["data_path"].endswith("data")
    overall = on_disk["metrics"]["overall"]
    assert overall["auc"] > 0.9 and overall["binary_accuracy"] > 0.85
    assert not {"accuracy", "loss"} & set(overall)  # the model's compiled copies are not recomputed
    assert 0 < overall["example_count"] < 5000
    assert any(k.startswith("payment_type=") for k in on_disk["metrics"]["slices"])
    assert {"CsvExampleGen", "Transform", "Trainer", "Evaluator", "Pusher"} <= set(on_disk["seconds_per_component"])
    assert on_disk["total_seconds"] >= sum(on_disk["seconds_per_component"].values()) * 0.9
    with open(on_disk["reports"]["evaluation"]) as f:
        assert "payment_type=Cash" in f.read()
    with open(on_disk["reports"]["data"]) as f:
        html = f.read()
    assert "Anomalies (train)" in html and "No anomalies found" in html
    # Why (not) blessed: the first run has no baseline, so only the value bounds were checked.
    verdicts = {(v["name"], v["kind"]): v for v in on_disk["thresholds"]}
    assert set(verdicts) == {("auc", "lower"), ("auc", "change"), ("binary_accuracy", "lower"),
                             ("binary_accuracy", "change")}
    assert verdicts[("auc", "lower")] == {"metric": "AUC", "name": "auc", "kind": "lower", "bound": 0.9,
                                          "value": overall["auc"], "passed": True, "note": ""}
    assert verdicts[("binary_accuracy", "change")]["passed"] is None
    assert all("\n" not in k for metrics in [overall, *on_disk["metrics"]["slices"].values()] for k in metrics)


def _table_rows(dom, first_cell):
    """{row header: [cell texts]} of the rendered table whose rows start with first_cell's pattern."""
    rows = {}
    for header, cells in re.findall(rf"<tr><th>({first_cell})</th>(.*?)</tr>", dom):
        rows[header] = [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", cells)]
    return rows


@pytest.mark.xdist_group("e2e")
def test_evaluation_report_renders_offline_with_sorted_slices_plots_and_verdicts(pipeline_run):
    from pipelines import pages
    from tests import browser

    browser.require_chromium()
    _, summary, _ = pipeline_run
    page = browser.render_page(summary["reports"]["evaluation"], "taxi_evaluation",
                               ("Thresholds", "Metrics by slice", "Plots (Overall)"), height=2200)
    dom = page.dom
    rows = _table_rows(dom, r"Overall|payment_type=[^<]*|trip_start_day=[^<]*")
    assert list(rows)[0] == "Overall" and set(list(rows)[1:]) == set(summary["metrics"]["slices"])
    sizes = [int(cells[0]) for cells in list(rows.values())[1:]]
    assert sizes == sorted(sizes, reverse=True) and int(rows["Overall"][0]) == summary["metrics"]["overall"]["example_count"]
    assert rows["Overall"][1].startswith(f"{summary['metrics']['overall']['auc']:.4f}")
    # Tips are recorded for card payments only: a cash slice has one class, and its AUC no meaning.
    cash = summary["metrics"]["slices"]["payment_type=Cash"]
    assert cash["mean_label"] == 0.0 and cash["auc"] is None and rows["payment_type=Cash"][1] == "not defined"
    assert dom.count('class="verdict pass"') == 2 and dom.count('class="verdict unknown"') == 2
    for title in ("ROC", "Precision-recall", "Calibration"):
        svg = re.search(rf'<svg class="plot" data-kind="lines" data-points="(\d+)"[^>]*aria-label="{title}"', dom)
        assert svg and int(svg.group(1)) >= (5 if title == "Calibration" else 50), title
    assert browser.colour_pixels(page.screenshot, pages.PALETTE[0]) > 500  # the curves were drawn


@pytest.mark.xdist_group("e2e")
def test_data_report_renders_offline_with_distributions_and_missing_rates(pipeline_run, taxi_spec):
    from pipelines import pages
    from tests import browser

    browser.require_chromium()
    _, summary, _ = pipeline_run
    page = browser.render_page(summary["reports"]["data"], "taxi_data",
                               ("Distributions: train vs eval", "Anomalies (train)", "Anomalies (eval)"), height=2200)
    dom = page.dom
    missing = _table_rows(dom, "[a-z_]+")
    rows = read_rows(taxi_csv_path(taxi_spec), limit=5000)
    for column in ("company", "dropoff_latitude", "fare"):
        share = sum(r[column] == "" for r in rows) / len(rows)
        _, train, evaluation = missing[column]
        assert float(train) == pytest.approx(share, abs=0.03) and float(evaluation) == pytest.approx(share, abs=0.04)
    for feature in ("fare", "payment_type", "trip_start_hour"):
        svg = re.search(rf'<svg class="plot" data-kind="bars" data-points="(\d+)"[^>]*aria-label="{feature}">(.*?)</svg>',
                        dom)
        assert svg and int(svg.group(1)) >= 4, feature
        assert {"train", "eval"} == set(re.findall(r'data-series="(\w+)"', svg.group(2)))
    assert browser.colour_pixels(page.screenshot, pages.PALETTE[1]) > 500  # eval's bars


@pytest.mark.xdist_group("e2e")
def test_unchanged_rerun_is_served_from_cache(pipeline_run):
    _, first, second = pipeline_run
    assert second["succeeded"] and second["model_version"] == first["model_version"]
    assert second["total_seconds"] < first["total_seconds"]
    assert first["baseline_model"] is None
    # Not even the Evaluator reruns: the candidate is never its own baseline.
    assert second["baseline_model"] is None
    assert max(second["seconds_per_component"].values()) < 1.0


@pytest.mark.xdist_group("e2e")
def test_a_model_failing_sandbox_validation_is_not_pushed(pipeline_run, sandbox_refused_run):
    tmp, first, _ = pipeline_run
    summary, _ = sandbox_refused_run
    assert summary["succeeded"] and summary["blessed"]  # the Evaluator still blesses it...
    assert not summary["pushed"]                          # ...but Pusher needs both blessings
    assert summary["sandbox"]["blessed"] is False
    assert len(summary["sandbox"]["reasons"]) == 1 and "max_p50_ms 0.001" in summary["sandbox"]["reasons"][0]
    assert summary["sandbox"]["rows_differing"] == 0      # the predictions themselves were right
    assert os.listdir(os.path.join(tmp, "models", "taxi")) == [first["model_version"]]
    ran = {k for k, v in summary["seconds_per_component"].items() if v >= 1.0}
    assert "sandbox_validator" in ran and not {"Transform", "Trainer"} & ran


_BEFORE_THE_EVALUATOR = ("CsvExampleGen", "StatisticsGen", "ExampleValidator", "data_gate", "Transform", "Trainer",
                         "sandbox_validator")


def _assert_only_the_evaluator_onward_ran(states):
    # Every node before the Evaluator and the sandbox (which takes the model and examples, not the
    # Evaluator's blessing; see the compiled-graph test below) come from TFX's cache; the Evaluator
    # reruns and so does Pusher, whose input blessing is new.
    for node in _BEFORE_THE_EVALUATOR:
        assert states[node] == "CACHED", (node, states)
    for node in ("Evaluator", "Pusher"):
        assert states[node] == "COMPLETE", (node, states)


@pytest.mark.xdist_group("e2e")
def test_a_thresholds_only_change_reruns_only_the_evaluator_onward(pipeline_run, thresholds_only_run):
    # Pusher runs and records a push that did not happen: TFX's Pusher checks the blessing in its
    # executor and marks the output not pushed (tfx/components/pusher/executor.py lines 63-87, 158-161).
    summary, states, copy, _ = thresholds_only_run
    assert summary["succeeded"] and summary["artifacts"]["model"] == pipeline_run[1]["artifacts"]["model"]
    assert not summary["blessed"] and not summary["pushed"] and summary["model_version"] is None
    assert os.listdir(os.path.join(copy, "models", "taxi")) == [pipeline_run[1]["model_version"]]
    _assert_only_the_evaluator_onward_ran(states)


@pytest.mark.xdist_group("e2e")
def test_a_run_failing_a_threshold_says_which_metric_value_and_bound_everywhere(thresholds_only_run):
    """Why not blessed, on a real refusal: TFX's Evaluator writes NOT_BLESSED when TFMA's validation
    fails (tfx/components/evaluator/executor.py lines 323-335); the console, run_summary.json and
    the evaluation report must each name the metric, its value, the bound and the verdict."""
    from pipelines import pages
    from tests import browser

    summary, states, copy, console = thresholds_only_run
    overall = summary["metrics"]["overall"]
    assert overall["auc"] < UNREACHABLE_AUC
    with open(os.path.join(copy, "run_summary.json")) as f:
        verdicts = {(v["name"], v["kind"]): v for v in json.load(f)["thresholds"]}
    assert set(verdicts) == {("auc", "lower"), ("auc", "change"), ("binary_accuracy", "lower"),
                             ("binary_accuracy", "change")}
    assert [k for k, v in verdicts.items() if v["passed"] is False] == [("auc", "lower")]
    failed = verdicts[("auc", "lower")]
    assert (failed["metric"], failed["bound"], failed["value"]) == ("AUC", UNREACHABLE_AUC, overall["auc"])
    assert verdicts[("binary_accuracy", "lower")]["value"] == overall["binary_accuracy"]
    assert verdicts[("binary_accuracy", "lower")]["passed"] is True and overall["binary_accuracy"] >= 0.75

    # The console: the run's progress, then the summary, whose one failing threshold line has all four.
    assert not [w for w in CONSOLE_NOISE if w in console], console
    assert component_lines(console) == {node: 1 for node in states}, console
    assert re.search(r"^  Trainer +cached ", console, re.M) and re.search(r"^  Evaluator +done ", console, re.M)
    thresholds = [line for line in console.splitlines() if line.startswith("threshold: ")]
    assert len(thresholds) == len(verdicts), console
    [failing] = [line for line in thresholds if "FAIL" in line]
    assert failing.split()[1] == "auc" and f"{overall['auc']:.4f}" in failing and f"{UNREACHABLE_AUC:g}" in failing
    assert re.search(r"^blessed: False +pushed: False$", console, re.M), console

    # The evaluation report, in Chromium: the failing bound's row flagged red with its value and bound.
    page = browser.render_page(summary["reports"]["evaluation"], "taxi_evaluation_not_blessed", ("Thresholds",),
                               computed={"td": ["background-color"]})
    rows = {tuple(r["cells"][:2]): r for r in browser.table_rows(page.dom, "thresholds")}
    assert len(rows) == len(verdicts)
    red = browser.css_rgb(pages.FLAGGED_BACKGROUND)
    row = rows[("auc", "value ≥")]
    assert (row["class"], row["background"], row["cells"][4]) == ("flagged", red, "FAIL")
    assert float(row["cells"][2]) == UNREACHABLE_AUC
    assert float(row["cells"][3]) == pytest.approx(overall["auc"], abs=5e-5)
    assert [r["cells"][4] for key, r in rows.items() if r["class"] == "flagged"] == ["FAIL"]
    headline = re.search(r'<section id="thresholds">.*?Not blessed: (.*?)</', page.dom, re.S)
    assert headline and f"{overall['auc']:.4f}" in headline.group(1) and "FAIL" in headline.group(1)


@pytest.mark.xdist_group("e2e")
def test_a_slices_only_change_reruns_only_the_evaluator_onward_with_the_new_slices(pipeline_run, slices_only_run):
    _, first, _ = pipeline_run
    summary, states, _, _ = slices_only_run
    assert summary["succeeded"] and summary["artifacts"]["model"] == first["artifacts"]["model"]
    _assert_only_the_evaluator_onward_ran(states)
    slices = summary["metrics"]["slices"]
    assert {name.split("=", 1)[0] for name in slices} == {"payment_type", "trip_start_month"}
    months = {name: m for name, m in slices.items() if name.startswith("trip_start_month=")}
    assert {int(name.split("=")[1]) for name in months} <= set(range(1, 13))
    # Every row has a month: the month slices partition the eval split.
    assert sum(m["example_count"] for m in months.values()) == summary["metrics"]["overall"]["example_count"]
    # The same model on the same rows: the slices both runs share have the first run's figures.
    for name, metrics in first["metrics"]["slices"].items():
        if name.startswith("payment_type="):
            assert slices[name]["example_count"] == metrics["example_count"], name
    assert summary["metrics"]["overall"]["auc"] == pytest.approx(first["metrics"]["overall"]["auc"], abs=1e-6)


def _compiled_nodes(spec_path, tmp):
    """{node id: its PipelineNode} of the compiled pipeline."""
    from tfx.dsl.compiler import compiler

    from components.feature_spec import load
    from pipelines.pipeline import Environment, create_pipeline

    env = Environment(pipeline_root=os.path.join(tmp, "root"), model_repository=os.path.join(tmp, "models"))
    ir = compiler.Compiler().compile(create_pipeline(load(spec_path), env))
    return {n.pipeline_node.node_info.id: n.pipeline_node for n in ir.nodes}


def _node_parameters(spec_path, tmp):
    """{node id: its serialized parameters} of the compiled pipeline: what TFX hashes into the cache key."""
    return {node: n.parameters.SerializeToString(deterministic=True)
            for node, n in _compiled_nodes(spec_path, tmp).items()}


def test_only_pusher_follows_the_evaluator_so_a_thresholds_change_leaves_the_sandbox_cached(tmp_path):
    # TFX's InfraValidator takes the model and examples, not the Evaluator's blessing
    # (tfx/components/infra_validator/component.py lines 89-95: model, serving_spec, examples), and Pusher takes both
    # blessings: a change that reruns the Evaluator alone reruns Pusher, and nothing else.
    nodes = _compiled_nodes(_sample_spec(str(tmp_path)), str(tmp_path))
    assert set(nodes["Evaluator"].downstream_nodes) == {"Pusher"}
    assert "Evaluator" not in nodes["sandbox_validator"].upstream_nodes
    assert {"Trainer", "CsvExampleGen"} <= set(nodes["sandbox_validator"].upstream_nodes)
    assert {"Evaluator", "sandbox_validator"} <= set(nodes["Pusher"].upstream_nodes)


@pytest.mark.parametrize("edit, changed", [
    (_lower_thresholds, {"Evaluator"}),
    (lambda raw: raw.update(slices=[["company"]]), {"Evaluator"}),
    (lambda raw: raw["training"]["schedule"].append({"learning_rate": 0.0001, "batch_size": 512, "epochs": 1}),
     {"Trainer"}),
    (lambda raw: raw["monitoring"].update(window_hours=6), set()),
], ids=["thresholds", "slices", "schedule", "monitoring"])
def test_each_component_sees_only_the_spec_keys_it_uses(tmp_path, edit, changed):
    # Downstream nodes rerun because their inputs are new artifacts (the run above shows it);
    # here: which nodes' own parameters, and so cache keys, an edit changes.
    before = _node_parameters(_sample_spec(str(tmp_path)), str(tmp_path))
    after = _node_parameters(_sample_spec(str(tmp_path), edit), str(tmp_path))
    assert before.keys() == after.keys()
    assert {n for n in before if before[n] != after[n]} == changed


@pytest.mark.xdist_group("e2e")
def test_new_data_is_judged_against_the_last_blessed_model(pipeline_run, changed_data_run):
    _, first, _ = pipeline_run
    summary = changed_data_run
    assert summary["succeeded"] and summary["seconds_per_component"]["Trainer"] > 1.0
    assert summary["baseline_model"] is not None
    assert summary["baseline_model"] == first["artifacts"]["model"] != summary["artifacts"]["model"]
    # With a baseline every change bound is checked, and the blessing is the verdicts' conjunction.
    changes = [v for v in summary["thresholds"] if v["kind"] == "change"]
    assert len(changes) == 2 and all(v["passed"] is not None and v["value"] is not None for v in changes)
    assert summary["blessed"] == all(v["passed"] for v in summary["thresholds"])
    if summary["pushed"]:
        assert int(summary["model_version"]) > int(first["model_version"])


# --- the data gate ----------------------------------------------------------------------

def _corrupt_and_run(taxi_spec, tmp, corrupt, **kwargs):
    rows = read_rows(taxi_csv_path(taxi_spec), limit=2500)
    rows = corrupt(rows)
    data = os.path.join(tmp, "data")
    write_sample(rows, data)
    with pytest.raises(Exception) as raised:
        _run(tmp, data, **kwargs)
    return str(raised.value)


def _assert_halted_before_training(tmp):
    nodes = _executed_nodes(tmp)
    assert "data_gate" in nodes
    assert not {"Transform", "Trainer", "Evaluator", "Pusher"} & nodes
    assert not os.path.exists(os.path.join(tmp, "models"))


@pytest.mark.xdist_group("gate")
def test_gate_halts_on_a_string_in_a_numeric_column_and_the_console_says_so_once(taxi_spec, tmp_path, capfd):
    """The command line's console (its file descriptors, as a terminal would see them): progress lines
    only, the failure once, cause first. In this process, to spare the suite a second import of TFX:
    the multiclass run (tests/test_other_tasks_e2e.py) checks a fresh process's import lines."""
    from pipelines import local_runner

    tmp = str(tmp_path)
    rows = read_rows(taxi_csv_path(taxi_spec), limit=2500)
    rows[2400]["trip_miles"] = "twelve"  # past the loader's 2,000-row sample: the gate must catch it
    data_csv = write_sample(rows, os.path.join(tmp, "data"))
    capfd.readouterr()
    code = local_runner.main(["--spec", _sample_spec(tmp), "--env", _env(tmp), "--data", os.path.dirname(data_csv),
                              "--summary", os.path.join(tmp, "s.json")])
    out = capfd.readouterr()
    assert code == 1, out.out[-2000:] + out.err[-4000:]
    _assert_halted_before_training(tmp)
    console = out.out + out.err
    assert not [w for w in CONSOLE_NOISE if w in console], console
    assert component_lines(out.out) == {node: 1 for node in _executed_nodes(tmp)}
    assert re.search(r"^  data_gate +FAILED ", out.out, re.M), out.out
    # The cause once, first, naming the component, the file, the line and the value; then the log.
    errors = out.err.splitlines()
    assert errors[0].startswith("error: data_gate: DataGateError: data gate:"), errors
    assert errors[1] == (f"  [train, eval] features.trip_miles.type: declared float but column 'trip_miles' holds "
                         f"'twelve' at {data_csv}:2402 (" + errors[1].split(":2402 (", 1)[-1]), errors
    assert console.count("holds 'twelve'") == 1 and console.count("DataGateError") == 1, console
    log = errors[-1].removeprefix("full log: ")
    assert errors[-1].startswith("full log: ") and os.path.dirname(log) == os.path.join(tmp, "logs")
    with open(log) as f:
        assert "Traceback" in f.read()  # the traceback is kept, in the log only


@pytest.mark.xdist_group("gate")
def test_gate_halts_on_a_missing_required_column(taxi_spec, tmp_path):
    def corrupt(rows):
        return [{k: v for k, v in r.items() if k != "payment_type"} for r in rows]
    message = _corrupt_and_run(taxi_spec, str(tmp_path), corrupt, check_data=False)
    assert "data gate" in message and "'payment_type'" in message and "missing" in message.lower()
    _assert_halted_before_training(str(tmp_path))


@pytest.mark.xdist_group("gate")
def test_gate_halts_on_a_category_outside_the_schema_domain(taxi_spec, tmp_path):
    def corrupt(rows):
        for r in rows[::10]:
            r["payment_type"] = "Bitcoin"
        return rows
    message = _corrupt_and_run(taxi_spec, str(tmp_path), corrupt)
    assert "data gate" in message and "'payment_type'" in message and "Bitcoin" in message
    _assert_halted_before_training(str(tmp_path))


@pytest.mark.xdist_group("e2e")
def test_promote_records_lineage_refuses_the_unblessed_and_rolls_back(pipeline_run, changed_data_run):
    from ops import release

    tmp, first, _ = pipeline_run
    repo, metadata = os.path.join(tmp, "models"), os.path.join(tmp, "metadata", "taxi.sqlite")
    v1 = int(first["model_version"])
    entry = release.promote(repo, metadata, "taxi", v1, who="tester")
    assert entry["previous"] is None and entry["metrics"]["auc"] == pytest.approx(first["metrics"]["overall"]["auc"])
    lineage = entry["lineage"]
    assert lineage["model"] == first["artifacts"]["model"] and lineage["code_commit"]
    assert lineage["data"] and lineage["schema"] and lineage["transform_graph"]
    # A version directory that no blessed push produced is refused, and nothing is logged for it.
    os.makedirs(os.path.join(repo, "taxi", "42"))
    open(os.path.join(repo, "taxi", "42", "saved_model.pb"), "w").close()
    with pytest.raises(release.ReleaseError, match="never pushed after a blessing"):
        release.promote(repo, metadata, "taxi", 42)
    if changed_data_run["pushed"]:
        v2 = int(changed_data_run["model_version"])
        release.promote(repo, metadata, "taxi", v2, who="tester")
        back = release.rollback(repo, metadata, "taxi", who="tester")
        assert (back["action"], back["previous"], back["version"]) == ("rollback", v2, v1)
    assert release.read_labels(repo, "taxi") == {"stable": v1}
    with open(os.path.join(repo, "models.config")) as f:  # the one file both servers read
        assert f'key: "stable"\n      value: {v1}' in f.read()
    assert lineage["sandbox"] and os.path.exists(os.path.join(lineage["sandbox"], "sandbox_report.json"))
    log = release.read_log(os.path.join(repo, "taxi"))
    assert [e["version"] for e in log] == ([v1, v2, v1] if changed_data_run["pushed"] else [v1])


@pytest.fixture(scope="module")
def parity_report(pipeline_run, changed_data_run):
    """`make parity` on the candidate (the changed-data run's push), written once where the review
    looks for it: the parity test checks it, and the review page shows it for that version."""
    from ops import parity

    tmp = pipeline_run[0]
    assert changed_data_run["pushed"], changed_data_run["sandbox"]  # new rows, a model as good: a second version
    path = os.path.join(tmp, "parity.json")
    report = parity.run("taxi", int(changed_data_run["model_version"]), model_repository=os.path.join(tmp, "models"),
                        metadata=os.path.join(tmp, "metadata", "taxi.sqlite"), out_path=path)
    return path, report


@pytest.mark.xdist_group("e2e")
def test_review_page_puts_the_candidate_beside_the_stable_version(pipeline_run, changed_data_run, parity_report,
                                                                  taxi_spec):
    from tests.test_review import check_review_of_real_runs

    tmp, first, _ = pipeline_run
    check_review_of_real_runs(tmp, first, changed_data_run, taxi_spec, parity_report[0])


@pytest.mark.xdist_group("e2e")
def test_parity_every_prediction_path_agrees_and_online_metrics_match_offline(changed_data_run, parity_report):
    path, report = parity_report
    assert report["model"] == "taxi" and report["version"] == int(changed_data_run["model_version"])
    assert report["rows"] == changed_data_run["metrics"]["overall"]["example_count"]
    assert report["training_path_unmatched_rows"] == 0
    assert set(report["paths"]) == {"serving_default", "serving_tf_example", "rest"}
    for found in report["paths"].values():
        assert found["rows_over_tolerance"] == 0 and found["max_abs_diff"] <= 1e-6
    online, offline = report["metrics"]["online_from_rest"], report["metrics"]["offline_evaluator"]
    assert online["binary_accuracy"] == pytest.approx(offline["binary_accuracy"], abs=1e-6)
    assert online["auc"] == pytest.approx(offline["auc"], abs=2e-3)  # TFMA's AUC uses 10,000 thresholds
    with open(path) as f:
        assert json.load(f) == report
