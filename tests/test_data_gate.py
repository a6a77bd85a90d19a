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
            "the probability of the answer given, in (0, 1]: re-export the span from the prediction log (make "
            "export-span), or leave the cell empty for a row that was never served"]
    _artifacts(tmp_path, {"count": INT, "price": FLOAT, "city": STRING, "big": INT})
    _with_propensity(stats, 0, 0, kind=STRING)
    assert "the data holds text values" in data_gate.find_problems(anomalies, stats, ["train", "eval"], spec)[0]
    # Without a `served` block the column is nobody's business here.
    assert data_gate.find_problems(anomalies, stats, ["train", "eval"], _small_spec(tmp_path)) == []
