"""The data gate's problem list, from statistics and anomalies written by hand (no pipeline run)."""

import os

from tensorflow_metadata.proto.v0 import anomalies_pb2, statistics_pb2

from components import data_gate
from tests.test_feature_spec import _small_spec, _write_csv

STRING, INT, FLOAT = (statistics_pb2.FeatureNameStatistics.STRING, statistics_pb2.FeatureNameStatistics.INT,
                      statistics_pb2.FeatureNameStatistics.FLOAT)


def _artifacts(tmp_path, kinds, anomaly=None):
    """Statistics and anomalies for both splits: {column: stats type}, every column 10 values present."""
    stats_uri, anomalies_uri = tmp_path / "stats", tmp_path / "anomalies"
    for split in ("train", "eval"):
        stats = statistics_pb2.DatasetFeatureStatisticsList()
        dataset = stats.datasets.add()
        for name, kind in kinds.items():
            feature = dataset.features.add()
            feature.path.step.append(name)
            feature.type = kind
            which = feature.string_stats if kind == STRING else feature.num_stats
            which.common_stats.num_non_missing = 10
        anomalies = anomalies_pb2.Anomalies()
        if anomaly:
            info = anomalies.anomaly_info[anomaly[0]]
            info.reason.add(short_description="Unexpected data type", description=anomaly[1])
        for uri, proto, name in ((stats_uri, stats, "FeatureStats.pb"), (anomalies_uri, anomalies, "SchemaDiff.pb")):
            os.makedirs(uri / f"Split-{split}", exist_ok=True)
            (uri / f"Split-{split}" / name).write_bytes(proto.SerializeToString())
    return str(anomalies_uri), str(stats_uri)


def test_a_bad_value_past_the_sample_is_reported_once_with_file_line_and_value(tmp_path):
    rows = "".join(f"{i},2.5,paris,0\n" for i in range(4998))
    path = _write_csv(tmp_path / "a.csv", "count,price,city,big\n" + rows + "many,2.5,lyon,1\n")  # line 5000
    spec = _small_spec(tmp_path)
    anomalies, stats = _artifacts(tmp_path, {"count": STRING, "price": FLOAT, "city": STRING, "big": INT},
                                  anomaly=("count", "Expected data of type: INT but got BYTES"))
    problems = data_gate.find_problems(anomalies, stats, ["train", "eval"], spec)
    assert problems[0].startswith(f"[train, eval] features.count.type: declared int but column 'count' holds 'many' "
                                  f"at {path}:5000 ("), problems
    assert problems[1:] == ["[train, eval] feature 'count': Unexpected data type: Expected data of type: INT but got "
                            "BYTES"]  # the schema's view of the same column, after the cause and once


def test_a_mistyped_column_the_files_cannot_explain_keeps_the_statistics_message(tmp_path):
    _write_csv(tmp_path / "a.csv", "count,price,city,big\n1,2.5,paris,0\n")  # the statistics saw other data
    anomalies, stats = _artifacts(tmp_path, {"count": STRING, "price": FLOAT, "city": STRING, "big": INT})
    assert data_gate.find_problems(anomalies, stats, ["train", "eval"], _small_spec(tmp_path)) == [
        "[train, eval] feature 'count': declared int but the data holds STRING values (a non-int value somewhere "
        "in the column)"]


def _served_spec(tmp_path):
    import dataclasses

    from components import feature_spec

    return dataclasses.replace(_small_spec(tmp_path), served=feature_spec.Served("inverse_propensity"))


def _with_propensity(stats_uri, low, high, kind=FLOAT):
    for split in ("train", "eval"):
        path = os.path.join(stats_uri, f"Split-{split}", "FeatureStats.pb")
        stats = statistics_pb2.DatasetFeatureStatisticsList.FromString(open(path, "rb").read())
        feature = stats.datasets[0].features.add()
        feature.path.step.append("propensity")
        feature.type = kind
        if kind == STRING:
            feature.string_stats.common_stats.num_non_missing = 10
        else:
            feature.num_stats.common_stats.num_non_missing = 10
            feature.num_stats.min, feature.num_stats.max = low, high
        open(path, "wb").write(stats.SerializeToString())


def test_a_propensity_outside_zero_to_one_stops_the_run_naming_the_column(tmp_path):
    _write_csv(tmp_path / "a.csv", "count,price,city,big\n1,2.5,paris,0\n")
    anomalies, stats = _artifacts(tmp_path, {"count": INT, "price": FLOAT, "city": STRING, "big": INT})
    spec = _served_spec(tmp_path)
    _with_propensity(stats, 0.1, 1.0)
    assert data_gate.find_problems(anomalies, stats, ["train", "eval"], spec) == []  # (0, 1]: fine
    for low, high in ((0.0, 0.9), (0.2, 1.5), (-1.0, 0.5)):
        _artifacts(tmp_path, {"count": INT, "price": FLOAT, "city": STRING, "big": INT})
        _with_propensity(stats, low, high)
        assert data_gate.find_problems(anomalies, stats, ["train", "eval"], spec) == [
            f"[train, eval] served.propensity_column 'propensity': values from {low:g} to {high:g}; a propensity is "
            "the probability of the row's policy (serving/proxy.py), in (0, 1]: re-export the span from the "
            "prediction log (make export-span), or leave the cell empty for a row that was never served"]
    _artifacts(tmp_path, {"count": INT, "price": FLOAT, "city": STRING, "big": INT})
    _with_propensity(stats, 0, 0, kind=STRING)
    assert "the data holds text values" in data_gate.find_problems(anomalies, stats, ["train", "eval"], spec)[0]
    # Without a `served` block the column is nobody's business here.
    assert data_gate.find_problems(anomalies, stats, ["train", "eval"], _small_spec(tmp_path)) == []


# --- holdback_only with nothing held back ----------------------------------------------------
def _policy_statistics(tmp_path, train_policies):
    """Both splits' statistics as TFDV computes them, with a policy column (eval: every row a model's, which the
    gate must not hold against the run: the Trainer fits the train split and evaluates on every row)."""
    import pandas as pd
    import tensorflow_data_validation as tfdv

    anomalies_uri, stats_uri = _artifacts(tmp_path, {})
    for split, policies in (("train", train_policies), ("eval", ["model"] * 3)):
        frame = pd.DataFrame({"policy": policies, "count": 1, "price": 2.5, "city": "paris", "big": 0})  # the spec's
        stats = tfdv.generate_statistics_from_dataframe(frame)
        (tmp_path / "stats" / f"Split-{split}" / "FeatureStats.pb").write_bytes(stats.SerializeToString())
    return anomalies_uri, stats_uri


def _holdback_spec(tmp_path, **changes):
    import dataclasses

    from components import feature_spec

    return dataclasses.replace(_small_spec(tmp_path), served=feature_spec.Served("holdback_only"), **changes)


def test_holdback_only_with_no_row_held_back_stops_before_transform_naming_the_fix(tmp_path, caplog):
    every_row_a_model = ["model"] * 27 + ["ab:candidate"] * 3
    anomalies, stats = _policy_statistics(tmp_path, every_row_a_model)
    spec = _holdback_spec(tmp_path)
    problems = data_gate.find_problems(anomalies, stats, ["train", "eval"], spec)
    assert len(problems) == 1, problems  # the train split's alone
    assert problems[0].startswith(f"[train] {spec.source}: served.use: holdback_only trains only on rows held back "
                                  "from the model (column 'policy' starting 'holdback:') or never served"), problems
    for part in ("none of the 30 rows of the train split (its statistics: 'model' 27, 'ab:candidate' 3)",
                 "0 held back", "PROXY_HOLDBACK_SHARE", "make export-span", "served.use: inverse_propensity"):
        assert part in problems[0], part
    # With a window the older spans, which the statistics do not describe, may hold such rows: a warning.
    window = _holdback_spec(tmp_path, data_path=str(tmp_path / "span-{SPAN}" / ""), rolling_spans=2)
    assert data_gate.find_problems(anomalies, stats, ["train", "eval"], window) == []
    assert "the window's older spans must hold rows held back or never served" in caplog.text


def test_holdback_only_passes_a_split_with_a_row_held_back_or_never_served(tmp_path):
    spec = _holdback_spec(tmp_path)
    for policies in (["model"] * 29 + ["holdback:fallback"], ["model"] * 29 + [None]):
        anomalies, stats = _policy_statistics(tmp_path, policies)
        assert data_gate.find_problems(anomalies, stats, ["train", "eval"], spec) == [], policies
    anomalies, stats = _policy_statistics(tmp_path, ["model"] * 30)
    inverse = _served_spec(tmp_path)  # inverse_propensity trains on every row
    assert data_gate.find_problems(anomalies, stats, ["train", "eval"], inverse) == []
