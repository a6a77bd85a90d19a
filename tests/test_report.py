"""pipelines/report.py and components/evaluation.py's names, on small synthetic inputs: metric
names, threshold verdicts, intervals, distributions of two datasets (the reports of a real run are
checked in headless Chromium in tests/test_pipeline_e2e.py; the multiclass evaluation page here, from
a TFMA result computed without a model)."""

import math
import os
import re

import pytest

from components.evaluation import metric_name, threshold_metric_names
from components.feature_spec import load
from pipelines import report
from tests.conftest import TAXI_SPEC


def _key(**fields):
    from tensorflow_model_analysis.proto import metrics_for_slice_pb2

    return metrics_for_slice_pb2.MetricKey(**fields)


def test_metric_names_are_readable_and_have_no_newline():
    from tensorflow_model_analysis.proto import metrics_for_slice_pb2 as m

    macro = _key(name="auc", aggregation_type=m.AggregationType(macro_average=True))
    assert str(macro.aggregation_type) == "macro_average: true\n"  # what TFMA's own view joins into the name
    assert metric_name(macro) == "macro_auc"
    assert metric_name(_key(name="precision", sub_key=m.SubKey(class_id={"value": 2}))) == "precision_class_2"
    assert metric_name(_key(name="recall", sub_key=m.SubKey(top_k={"value": 3}))) == "recall_top_3"
    assert metric_name(_key(name="auc", is_diff=True)) == "auc_diff"
    assert metric_name(m.PlotKey(name="confusion_matrix_plot", sub_key=m.SubKey(class_id={"value": 0}))) == \
        "confusion_matrix_plot_class_0"


def test_threshold_names_follow_the_task():
    spec = load(TAXI_SPEC)
    assert threshold_metric_names(spec) == {"AUC": "auc", "BinaryAccuracy": "binary_accuracy"}


def _evaluation(auc, accuracy, diffs=None, failures=(), ok=True):
    overall = {"examples": 100, "metrics": {"auc": auc, "binary_accuracy": accuracy}, "intervals": {},
               "diffs": diffs or {}, "plots": {}}
    return {"slices": {"Overall": overall}, "validation": {"ok": ok, "rubber_stamp": not diffs,
                                                           "failures": list(failures)}}


def test_threshold_verdicts_take_tfma_failures_and_say_when_a_change_was_not_checked():
    spec = load(TAXI_SPEC)  # AUC lower 0.90 change -0.01; BinaryAccuracy lower 0.85 change -0.01
    first = report.threshold_verdicts(spec, _evaluation(0.95, 0.80, failures=[
        {"slice": "Overall", "metric": "binary_accuracy", "kind": "value", "value": 0.80, "message": "too low"}],
        ok=False))
    by = {(v["name"], v["kind"]): v for v in first}
    assert set(by) == {("auc", "lower"), ("auc", "change"), ("binary_accuracy", "lower"), ("binary_accuracy", "change")}
    assert by[("auc", "lower")]["passed"] is True and by[("auc", "lower")]["value"] == 0.95
    assert by[("binary_accuracy", "lower")]["passed"] is False and by[("binary_accuracy", "lower")]["bound"] == 0.85
    assert by[("auc", "change")]["passed"] is None and "no other blessed model to compare with" in by[("auc", "change")]["note"]
    assert report.describe_verdict(by[("binary_accuracy", "lower")]) == \
        "binary_accuracy 0.8000, lower bound 0.85: FAIL (too low)"
    second = report.threshold_verdicts(spec, _evaluation(0.95, 0.90, diffs={"auc": -0.02, "binary_accuracy": 0.01},
                                                         failures=[{"slice": "Overall", "metric": "auc",
                                                                    "kind": "change", "value": -0.02, "message": "m"}],
                                                         ok=False))
    by = {(v["name"], v["kind"]): v for v in second}
    assert by[("auc", "change")]["passed"] is False and by[("auc", "change")]["value"] == -0.02
    assert by[("binary_accuracy", "change")]["passed"] is True and by[("auc", "lower")]["passed"] is True
    assert report.describe_verdict(by[("auc", "change")]) == \
        "auc change vs baseline -0.0200, allowed >= -0.01: FAIL (m)"


def _stats(num_examples, numeric_buckets, strings, missing):
    from tensorflow_metadata.proto.v0 import statistics_pb2 as s

    dataset = s.DatasetFeatureStatistics(num_examples=num_examples)
    fare = dataset.features.add(name="fare")
    # An empty value list counts as present in TFDV: the missing are the examples minus the values.
    fare.num_stats.common_stats.num_missing = missing // 2
    fare.num_stats.common_stats.tot_num_values = num_examples - missing
    fare.num_stats.common_stats.max_num_values = 1
    fare.num_stats.histograms.add(type=s.Histogram.STANDARD, buckets=[
        s.Histogram.Bucket(low_value=lo, high_value=hi, sample_count=c) for lo, hi, c in numeric_buckets])
    payment = dataset.features.add(name="payment_type")
    payment.string_stats.common_stats.tot_num_values = sum(strings.values())
    for value, count in strings.items():
        payment.string_stats.top_values.add(value=value, frequency=count)
    return dataset


def test_distributions_of_two_datasets_share_buckets_and_categories():
    train = _stats(100, [(0, 10, 50), (10, 20, 50)], {"Cash": 60, "Credit Card": 30, "Dispute": 10}, missing=0)
    served = _stats(40, [(10, 20, 20), (20, 40, 20)], {"Credit Card": 30, "Bitcoin": 10}, missing=10)
    labels, a, b = report.distribution(train.features[0], served.features[0], buckets=4)
    assert labels == ["0–10", "10–20", "20–30", "30–40"]
    assert a == pytest.approx([0.5, 0.5, 0, 0]) and b == pytest.approx([0, 0.5, 0.25, 0.25])
    labels, a, b = report.distribution(train.features[1], served.features[1])
    assert labels == ["Cash", "Credit Card", "Dispute", "(other)"]  # served's Bitcoin lands in (other)
    assert a == pytest.approx([0.6, 0.3, 0.1, 0.0]) and b == pytest.approx([0.0, 0.75, 0.0, 0.25])
    assert report.missing_rate(served.features[0], served.num_examples) == 0.25
    page = report.statistics_section(train, served, "training", "served", "Distributions")
    assert page.count("<svg class='plot' data-kind='bars'") == 2 and "missing in served" in page


def test_the_console_summary_names_each_threshold_and_the_failing_one(capsys):
    spec = load(TAXI_SPEC)
    evaluation = _evaluation(0.87, 0.90, failures=[
        {"slice": "Overall", "metric": "auc", "kind": "value", "value": 0.87, "message": "below 0.9"}], ok=False)
    summary = {"pipeline_name": "taxi", "succeeded": True, "total_seconds": 3.0, "error": None, "sandbox": None,
               "blessed": False, "pushed": False, "metrics": {"overall": {"auc": 0.87}},
               "thresholds": report.threshold_verdicts(spec, evaluation), "log": "build/logs/x.log"}
    report.print_summary(summary)
    lines = capsys.readouterr().out.splitlines()
    assert "threshold: auc 0.8700, lower bound 0.9: FAIL (below 0.9)" in lines
    assert "threshold: binary_accuracy 0.9000, lower bound 0.85: pass" in lines
    assert sum(line.startswith("threshold: ") for line in lines) == 4
    page = report.thresholds_section(summary)
    assert "Not blessed: auc 0.8700, lower bound 0.9: FAIL (below 0.9)." in page
    assert page.count("verdict fail") == 1 and page.count("verdict pass") == 1
    flagged = re.findall(r"<tr class='flagged'><td>(\w+)</td><td>([^<]+)</td>", page)
    assert flagged == [("auc", "value ≥")]  # the failed bound's row only
    assert page.count("<td>no baseline</td>") == 2 and page.count("verdict unknown") == 2


def test_intervals_match_a_derivation_a_simulation_and_a_published_wilson_example():
    import numpy as np
    from sklearn.metrics import roc_auc_score

    # AUC 0.5 on n positives and n negatives: Q1 = Q2 = 1/3, so SE^2 = (1/4 + (n - 1) / 6) / n^2.
    low, high = report.auc_interval(0.5, 100, 100)
    assert (high - low) / 2 == pytest.approx(1.959964 * math.sqrt((0.25 + 99 / 6) / 100 ** 2), rel=1e-4)
    # And the spread of AUC over simulated samples (binormal scores, AUC about 0.86) agrees.
    rng = np.random.default_rng(0)
    aucs = [roc_auc_score(np.r_[np.ones(150), np.zeros(250)], np.r_[rng.normal(1.5, 1, 150), rng.normal(0, 1, 250)])
            for _ in range(400)]
    low, high = report.auc_interval(float(np.mean(aucs)), 150, 250)
    assert (high - low) / 2 / 1.959964 == pytest.approx(np.std(aucs), rel=0.15)
    # Wilson (1927) as in Newcombe (1998), example: 81 of 263 -> 0.2553 to 0.3662.
    low, high = report.proportion_interval(81 / 263, 263)
    assert (low, high) == (pytest.approx(0.2553, abs=1e-4), pytest.approx(0.3662, abs=1e-4))
    narrow = report.proportion_interval(81 / 263, 2630)
    assert low < narrow[0] < 81 / 263 < narrow[1] < high
    assert report.auc_interval(0.9, 0, 10) is None and report.proportion_interval(0.5, 0) is None


@pytest.mark.parametrize("config, names", [
    ("synthetic_multiclass.yaml", {"SparseCategoricalAccuracy": "sparse_categorical_accuracy"}),
    ("synthetic_regression.yaml", {"MeanAbsoluteError": "mean_absolute_error",
                                   "RootMeanSquaredError": "root_mean_squared_error"})])
def test_threshold_names_of_keras_metrics(config, names):
    # The names the evaluation outputs of these specs carried in earlier runs (run_summary.json).
    assert threshold_metric_names(load(TAXI_SPEC.replace("taxi.yaml", config))) == names


def _tfma_result_of_the_multiclass_spec(path):
    """What the Evaluator writes for configs/synthetic_multiclass.yaml (its EvalConfig from
    components/evaluation.py: accuracy, one-vs-rest AUC/precision/recall per class and macro-averaged,
    per-class plots), computed by TFMA itself on 60 predictions without a model (model-agnostic, as
    tfma.analyze_raw_data does from a DataFrame). Region "south" has no row of class 2 (high), so
    metrics of class 2 against the rest that need a positive are undefined there. Channel "app" (the
    last 12 south rows) is never predicted high: precision of class 2 (TFMA: tp / (tp + fp), NaN
    when nothing is predicted positive, metrics/confusion_matrix_metrics.py
    _divide_only_positive_denominator and Precision.result) is undefined there. 11 of every 20 rows
    are predicted right: accuracy 0.55, under the spec's lower bound 0.65."""
    import numpy as np
    import pandas as pd
    import tensorflow_model_analysis as tfma

    from components.evaluation import eval_config

    spec = load(TAXI_SPEC.replace("taxi.yaml", "synthetic_multiclass.yaml"))
    config = eval_config(spec)
    del config.model_specs[:]
    config.model_specs.add(label_key="label", prediction_key="probabilities")  # columns of the frame
    for metrics_spec in config.metrics_specs:  # TFMA refuses a change bound without a baseline outside a pipeline
        for metric in metrics_spec.metrics:
            for threshold in metric.per_slice_thresholds:
                threshold.threshold.ClearField("change_threshold")
    rows = []
    for i in range(60):
        region = "north" if i < 36 else "south"
        label = i % 3 if region == "north" else i % 2
        predicted = label if i % 20 < 11 else (label + 1) % 3
        channel = "app" if i >= 48 else "web"
        if channel == "app" and predicted == 2:
            predicted = 0  # still wrong: accuracy unchanged, and "high" never predicted on app
        probabilities = np.full(3, 0.15)
        probabilities[predicted] = 0.7
        rows.append({"label": label, "probabilities": probabilities.tolist(), "region": region, "channel": channel})
    frame = pd.DataFrame(rows)
    tfma.analyze_raw_data(frame, config, output_path=str(path))
    return spec, frame


def test_the_multiclass_evaluation_page_renders_per_class_and_macro_metrics_and_says_not_defined(tmp_path):
    import numpy as np
    from sklearn.metrics import accuracy_score, roc_auc_score

    from pipelines import pages
    from tests import browser

    browser.require_chromium()
    spec, frame = _tfma_result_of_the_multiclass_spec(tmp_path / "evaluation")
    evaluated = report.read_evaluation(str(tmp_path / "evaluation"))
    summary = {"pipeline_name": spec.name, "blessed": False, "pushed": False, "model_version": None,
               "baseline_model": None, "thresholds": report.threshold_verdicts(spec, evaluated),
               "metrics": {"overall": evaluated["slices"]["Overall"]["metrics"]},
               "artifacts": {"statistics": None, "anomalies": None, "evaluation": str(tmp_path / "evaluation")}}
    page = browser.render_page(report.write_html(summary, spec, str(tmp_path / "reports"))["evaluation"],
                               "synthetic_multiclass_evaluation", ("Thresholds", "Metrics by slice", "Plots (Overall)"),
                               height=1600, computed={"td": ["background-color"]})

    head = re.findall(r"<th>([^<]*)</th>", re.search(r'<section id="metrics">.*?<tr>(.*?)</tr>', page.dom, re.S).group(1))
    rows = {r["cells"][0]: dict(zip(head, r["cells"])) for r in browser.table_rows(page.dom, "metrics")}
    assert list(rows) == ["Overall", "channel=web", "region=north", "region=south", "channel=app"]  # then by size

    def shown(slice_name, metric):
        text = rows[slice_name][metric]
        return text if text == "not defined" else float(text.split()[0])  # the value before its interval

    # Per class and macro-averaged, against scikit-learn on the same predictions.
    labels, scores = frame["label"].to_numpy(), np.array(frame["probabilities"].tolist())
    assert shown("Overall", "sparse_categorical_accuracy") == pytest.approx(
        accuracy_score(labels, scores.argmax(axis=1)), abs=1e-4)
    per_class = [roc_auc_score(labels == k, scores[:, k]) for k in range(3)]
    for k in range(3):
        assert shown("Overall", f"auc_class_{k}") == pytest.approx(per_class[k], abs=2e-3)
    assert shown("Overall", "macro_auc") == pytest.approx(sum(per_class) / 3, abs=2e-3)
    south = frame["region"] == "south"
    assert shown("region=south", "auc_class_0") == pytest.approx(
        roc_auc_score(labels[south] == 0, scores[south, 0]), abs=2e-3)
    # No "high" row in the south: AUC and recall of high vs rest, and their macro averages, are
    # undefined; precision is defined (rows were predicted high) and 0.
    for metric in ("auc_class_2", "recall_class_2", "macro_auc", "macro_recall"):
        assert shown("region=south", metric) == "not defined", metric
        assert shown("region=north", metric) != "not defined", metric
    assert shown("region=south", "precision_class_2") == 0.0
    # Nothing predicted high on app: its precision has no denominator, so it is not defined (not 0),
    # and so is the macro average over the classes that include it.
    app = (frame["channel"] == "app").to_numpy()
    assert not (scores[app].argmax(axis=1) == 2).any()
    for metric in ("precision_class_2", "macro_precision"):
        assert shown("channel=app", metric) == "not defined", metric
    assert shown("channel=web", "precision_class_2") != "not defined"
    assert re.search(r'<td[^>]*><span class="undefined">not defined</span></td>', page.dom)
    for name in spec.label.classes:
        assert f'aria-label="ROC ({name} vs rest)"' in page.dom

    # The failed bound is red; the change bound, unchecked without a baseline, is not.
    red = browser.css_rgb(pages.FLAGGED_BACKGROUND)
    thresholds = {tuple(r["cells"][:2]): r for r in browser.table_rows(page.dom, "thresholds")}
    failed = thresholds[("sparse_categorical_accuracy", "value ≥")]
    assert failed["cells"][4] == "FAIL" and (failed["class"], failed["background"]) == ("flagged", red)
    unchecked = thresholds[("sparse_categorical_accuracy", "change vs baseline ≥")]
    assert unchecked["cells"][4] == "not checked" and unchecked["class"] == "" and unchecked["background"] != red
    assert "Not blessed: sparse_categorical_accuracy 0.5500, lower bound 0.65: FAIL" in page.dom


def test_tfma_takes_the_model_type_from_the_eval_config_without_loading_the_model(monkeypatch):
    # TFMA 0.47 utils/model_util.py get_model_type (lines 166-177): a ModelSpec without model_type
    # makes it load the whole SavedModel with tf.keras.models.load_model just to see its class.
    import tensorflow as tf
    import tensorflow_model_analysis as tfma

    from components.evaluation import eval_config

    def refuse(*args, **kwargs):
        raise AssertionError("TFMA loaded the model to find its type")

    monkeypatch.setattr(tf.keras.models, "load_model", refuse)
    (model_spec,) = eval_config(load(TAXI_SPEC)).model_specs
    assert tfma.utils.get_model_type(model_spec, "/no/model/here") == tfma.constants.TF_KERAS


def test_the_data_page_renders_a_real_tfdv_anomaly_with_its_feature_and_reason(tmp_path):
    # TFDV's own anomaly (validate_statistics against a schema inferred on train), written where
    # ExampleValidator writes it (Split-<split>/SchemaDiff.pb), shown in the page's anomalies table.
    import pandas as pd
    import tensorflow_data_validation as tfdv

    from tests import browser

    browser.require_chromium()
    frames = {"train": pd.DataFrame({"payment_type": ["Cash", "Credit Card"] * 20, "fare": [float(i) for i in range(40)]}),
              "eval": pd.DataFrame({"payment_type": ["Cash", "Bitcoin"] * 10, "fare": [float(i) for i in range(20)]})}
    statistics = {split: tfdv.generate_statistics_from_dataframe(frame) for split, frame in frames.items()}
    schema = tfdv.infer_schema(statistics["train"])
    found = {}
    for split, stats in statistics.items():
        for folder, proto in (("statistics", stats), ("anomalies", tfdv.validate_statistics(stats, schema))):
            os.makedirs(tmp_path / folder / f"Split-{split}")
            name = "FeatureStats.pb" if folder == "statistics" else "SchemaDiff.pb"
            (tmp_path / folder / f"Split-{split}" / name).write_bytes(proto.SerializeToString())
            if folder == "anomalies":
                found[split] = proto
    assert not found["train"].anomaly_info and list(found["eval"].anomaly_info) == ["payment_type"]
    summary = {"pipeline_name": "tiny", "data_path": "frames", "metrics": {"overall": {}},
               "artifacts": {"statistics": str(tmp_path / "statistics"), "anomalies": str(tmp_path / "anomalies")}}
    spec = load(TAXI_SPEC)
    page = browser.render_page(report.write_html(summary, spec, str(tmp_path / "reports"))["data"], "tiny_data_anomaly",
                               ("Anomalies (train)", "Anomalies (eval)"), min_ink=5000)
    [row] = browser.table_rows(page.dom, "anomalies-eval")
    feature, reason, description = row["cells"]
    assert (feature, reason) == ("payment_type", "Unexpected string values")  # TFDV's ENUM_TYPE_UNEXPECTED_STRING_VALUES
    assert "Bitcoin" in description
    assert re.search(r'<section id="anomalies-train">.*?No anomalies found\..*?</section>', page.dom, re.S)


def _tfma_output_with_a_baseline(path):
    """An Evaluator output as TFMA writes it when a baseline model is given, from TFMA's own writers:
    the baseline's metrics under its model_name, the candidate's under its own, and each difference
    under the candidate's key with is_diff (TFMA 0.47 evaluators/metrics_plots_and_validations_evaluator.py
    :628-657 add_diff_metrics: candidate minus baseline; metric_types.py:361-366). Slices: Overall,
    the holdback policy slice a spec with served: declares, and a slice of positives only (AUC undefined)."""
    import tensorflow as tf
    import tensorflow_model_analysis as tfma
    from tensorflow_model_analysis.metrics import metric_types
    from tensorflow_model_analysis.writers import eval_config_writer, metrics_plots_and_validations_writer as writer

    config = tfma.EvalConfig(model_specs=[tfma.ModelSpec(name="candidate", label_key="tips"),
                                          tfma.ModelSpec(name="baseline", label_key="tips", is_baseline=True)])
    figures = {  # slice: (examples, mean label, {metric: (candidate, baseline)})
        (): (300, 0.4, {"auc": (0.82, 0.79), "binary_accuracy": (0.74, 0.75)}),
        (("policy", "holdback:fallback"),): (60, 0.3, {"auc": (0.70, 0.72), "binary_accuracy": (0.71, 0.66)}),
        (("payment_type", "Prcard"),): (5, 1.0, {"auc": (0.0, 0.0), "binary_accuracy": (0.8, 0.6)}),
    }
    os.makedirs(path)
    with tf.io.TFRecordWriter(os.path.join(path, "metrics-00000-of-00001.tfrecord")) as records:
        for slice_key, (examples, mean_label, metrics) in figures.items():
            values = {}
            for model in ("candidate", "baseline"):
                values[metric_types.MetricKey("example_count", model_name=model)] = float(examples)
                values[metric_types.MetricKey("mean_label", model_name=model)] = mean_label
            for name, (candidate, baseline) in metrics.items():
                key = metric_types.MetricKey(name, model_name="candidate")
                values[key], values[key.make_baseline_key("baseline")] = candidate, baseline
                values[key.make_diff_key()] = candidate - baseline
            proto = writer.convert_slice_metrics_to_proto((slice_key, values), None)
            records.write(proto.SerializeToString())
    with open(os.path.join(path, "eval_config.json"), "w") as f:
        f.write(eval_config_writer._serialize_eval_run(config, "", "tfrecord", {}))


def test_each_slice_shows_the_candidate_the_baseline_and_their_difference(tmp_path):
    from tests import browser

    evaluation = str(tmp_path / "evaluation")
    _tfma_output_with_a_baseline(evaluation)
    evaluated = report.read_evaluation(evaluation)
    compared = report.versus_baseline(evaluated)
    assert list(compared) == ["Overall", "policy=holdback:fallback", "payment_type=Prcard"]
    holdback = compared["policy=holdback:fallback"]
    assert holdback["auc"]["candidate"] == pytest.approx(0.70) and holdback["auc"]["baseline"] == pytest.approx(0.72)
    assert holdback["auc"]["difference"] == pytest.approx(-0.02)
    assert holdback["binary_accuracy"]["difference"] == pytest.approx(0.05)
    # The baseline's figures are not mistaken for the candidate's.
    assert evaluated["slices"]["Overall"]["metrics"]["auc"] == pytest.approx(0.82)
    # Positives only: AUC is undefined for both models, and so is its change; accuracy is defined.
    assert compared["payment_type=Prcard"]["auc"] == {"candidate": None, "baseline": None, "difference": None}
    assert compared["payment_type=Prcard"]["binary_accuracy"]["difference"] == pytest.approx(0.2)

    spec = load(TAXI_SPEC)
    summary = {"pipeline_name": spec.name, "blessed": False, "pushed": False, "model_version": None,
               "baseline_model": "/models/7", "thresholds": [], "metrics": {"overall": {"auc": 0.82}},
               "artifacts": {"statistics": None, "anomalies": None, "evaluation": evaluation}}
    with open(report.write_html(summary, spec, str(tmp_path / "reports"))["evaluation"]) as f:
        page = f.read().replace("'", '"')  # the attribute quotes a browser's DOM would show
    rows = {tuple(r["cells"][:2]): r["cells"][2:] for r in browser.table_rows(page, "baseline")}
    assert rows[("policy=holdback:fallback", "auc")] == ["0.7000", "0.7200", "-0.0200"]
    assert rows[("payment_type=Prcard", "auc")] == ["not defined"] * 3
    assert rows[("Overall", "binary_accuracy")] == ["0.7400", "0.7500", "-0.0100"]
