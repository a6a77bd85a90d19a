"""Tests for components.feature_spec: loading, the errors it names, checking a spec against CSVs.

Pure Python: nothing here imports TensorFlow, so the whole file runs in about a second.
"""

import copy
import csv
import dataclasses
import os
import re

import pytest
import yaml

from components import feature_spec
from components.feature_spec import FeatureSpec, SpecError

try:  # the repo root on sys.path (python -m pytest from the root)
    from tests import datasets
except ImportError:  # pytest's default rootdir-less import mode puts tests/ itself on sys.path
    import datasets

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO_ROOT, "configs")
TAXI = os.path.join(CONFIGS, "taxi.yaml")
SOURCE = "test.yaml"


@pytest.fixture(scope="module")
def taxi_raw():
    with open(TAXI) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def taxi():
    return feature_spec.load(TAXI)


def _mutated(raw, mutate):
    raw = copy.deepcopy(raw)
    mutate(raw)
    return raw


def _parse_error(raw) -> str:
    with pytest.raises(SpecError) as info:
        feature_spec.parse(raw, source=SOURCE)
    return str(info.value)


def _names_key(message: str, key: str) -> bool:
    """The message is '<source>: <key>: <why>' and names exactly `key` (not a longer or shorter path)."""
    return message.startswith(f"{SOURCE}: {key}: ")


# --- the taxi spec -------------------------------------------------------------------------


def test_taxi_loads_with_its_real_values(taxi):
    assert taxi.name == "taxi"
    assert taxi.task == "binary"
    assert taxi.num_classes == 2
    assert taxi.source == TAXI
    assert taxi.split == {"train": 2, "eval": 1}
    assert taxi.data_path.endswith(os.path.join("tfx", "examples", "chicago_taxi_pipeline", "data", "simple"))
    assert "{tfx}" not in taxi.data_path and os.path.isabs(taxi.data_path)
    assert taxi.schema_path == os.path.join(REPO_ROOT, "configs", "schemas", "taxi.pbtxt")

    assert taxi.label.name == "big_tipper"
    assert taxi.label.column is None
    assert taxi.label.derive == {"column": "tips", "op": ">", "other": "fare", "scale": 0.2}
    assert taxi.label.classes == ("no", "yes")
    assert taxi.label.source_columns == ("tips", "fare")


def test_taxi_tips_is_a_label_column_not_a_feature(taxi):
    assert "tips" in taxi.label_columns
    assert "tips" not in taxi.features
    assert "tips" in taxi.columns
    tips = taxi.label_columns["tips"]
    assert (tips.type, tips.transform, tips.missing.fill) == ("float", "passthrough", 0.0)
    assert "fare" in taxi.features  # the other side of the comparison is a real feature


def test_taxi_features(taxi):
    assert len(taxi.features) == 17
    company = taxi.features["company"]
    assert (company.type, company.transform, company.top_k, company.oov_buckets) == ("string", "vocabulary", 100, 5)
    assert company.missing == feature_spec.MissingPolicy(fill="", indicator=True)
    assert company.transforms == ("vocabulary",)
    assert taxi.features["payment_type"].required
    assert not taxi.features["company"].required
    assert taxi.features["pickup_census_tract"].hash_buckets == 64
    assert taxi.features["pickup_latitude"].buckets == 20
    assert taxi.features["trip_start_timestamp"].missing.fill == "mean"
    assert taxi.features["fare"].transforms == ("log", "bucketize")
    assert taxi.features["fare"].oov_buckets == 1 and taxi.features["fare"].top_k is None  # defaults


def test_taxi_slices_thresholds_training(taxi):
    assert taxi.slices == (("payment_type",), ("trip_start_day",))
    assert taxi.thresholds == (
        feature_spec.Threshold(metric="AUC", lower=0.90, change=-0.01),
        feature_spec.Threshold(metric="BinaryAccuracy", lower=0.85, change=-0.01),
    )
    training = taxi.training
    assert training.strategy == {"type": "default"}
    assert training.hidden_units == (64, 32)
    assert training.embedding_dim == 4
    assert training.schedule == (feature_spec.Stage(0.003, 256, 4), feature_spec.Stage(0.0005, 1024, 2))


def test_taxi_data_matches_its_spec(taxi):
    if not os.path.isdir(taxi.data_path):
        pytest.skip("the tfx package's taxi data is not installed")
    feature_spec.check_against_data(taxi, sample_rows=500)


def test_custom_config_round_trip(taxi):
    config = taxi.to_custom_config()
    assert config["feature_spec_source"] == TAXI
    assert isinstance(config["feature_spec"], dict)
    assert FeatureSpec.from_custom_config(config) == taxi


def test_custom_config_round_trip_through_json(taxi):
    import json  # what a TFX component's custom_config goes through

    config = json.loads(json.dumps(taxi.to_custom_config()))
    assert FeatureSpec.from_custom_config(config) == taxi


def test_defaults_when_optional_sections_are_left_out(taxi_raw):
    raw = _mutated(taxi_raw, lambda r: [r.pop(k) for k in ("slices", "thresholds", "training", "schema")])
    raw["data"].pop("split")
    spec = feature_spec.parse(raw, source=SOURCE)
    assert spec.slices == () and spec.thresholds == () and spec.schema_path is None
    assert spec.split == {"train": 2, "eval": 1}
    assert spec.training.strategy == {"type": "default"}
    assert spec.training.schedule == (feature_spec.Stage(0.001, 128, 5),)


# --- malformed specs: SpecError naming the exact key ---------------------------------------


def _set(path, value):
    """A mutation that sets raw[a][b]... = value for path 'a.b...'."""
    def mutate(raw):
        *parents, last = path.split(".")
        node = raw
        for p in parents:
            node = node[p]
        node[last] = value
    return mutate


def _multiclass_label(classes):
    def mutate(raw):
        raw["task"] = "multiclass"
        raw["label_columns"]["grade"] = {"type": "string"}
        raw["label"] = {"name": "kind", "column": "grade", "classes": classes}
    return mutate


def _schedule_stage(i, **changes):
    def mutate(raw):
        raw["training"]["schedule"][i].update(changes)
    return mutate


MALFORMED = [
    # (id, mutation, key the message must name, a fragment it must hold)
    ("unknown top-level key", _set("owner", "me"), "owner", "unknown key"),
    ("unknown data key", _set("data.format", "csv"), "data.format", "unknown key"),
    ("missing task", lambda r: r.pop("task"), "task", "is required"),
    ("unknown task", _set("task", "ranking"), "task", "'ranking' is not one of"),
    ("bad split", _set("data.split", {"train": 2, "test": 1}), "data.split.test", "allowed: eval, train"),
    ("zero split", _set("data.split", {"train": 0, "eval": 1}), "data.split.train", "must be positive, got 0"),
    ("no features", _set("features", {}), "features", "declares no feature"),
    ("feature not a mapping", _set("features.fare", "float"), "features.fare", "must be a mapping"),
    ("unknown feature key", _set("features.company.vocab_size", 3), "features.company.vocab_size", "unknown key"),
    ("unknown type", _set("features.fare.type", "double"), "features.fare.type", "'double' is not one of"),
    ("missing type", lambda r: r["features"]["fare"].pop("type"), "features.fare.type", "is required"),
    ("unknown transform", _set("features.company.transform", "onehot"), "features.company.transform",
     "'onehot' is not one of"),
    ("missing transform", lambda r: r["features"]["company"].pop("transform"), "features.company.transform",
     "is required"),
    ("string column with zscore", _set("features.company.transform", "zscore"), "features.company.transform",
     "needs a numeric column"),
    ("string column with log", _set("features.payment_type.transform", "log"), "features.payment_type.transform",
     "needs a numeric column"),
    ("string column with bucketize", _set("features.company.transform", "bucketize"),
     "features.company.transform", "needs a numeric column"),
    ("string column with passthrough", _set("features.company.transform", "passthrough"),
     "features.company.transform", "needs a numeric column"),
    ("fill mean on a string column", _set("features.company.missing", {"fill": "mean"}),
     "features.company.missing.fill", "'mean' needs a numeric column"),
    ("fill mean on a vocabulary column", _set("features.trip_start_hour.missing", {"fill": "mean"}),
     "features.trip_start_hour.missing.fill", "categorical transform"),
    ("fill mean on a hash column", _set("features.pickup_census_tract.missing", {"fill": "mean"}),
     "features.pickup_census_tract.missing.fill", "categorical transform"),
    ("numeric fill on a string column", _set("features.company.missing", {"fill": 0}),
     "features.company.missing.fill", "must be a string"),
    ("string fill on a numeric column", _set("features.fare.missing", {"fill": "zero"}),
     "features.fare.missing.fill", "must be a finite number or 'mean'"),
    ("bool fill on a numeric column", _set("features.fare.missing", {"fill": True}),
     "features.fare.missing.fill", "must be a finite number"),
    ("fractional fill on an int vocabulary", _set("features.trip_start_hour.missing", {"fill": 0.5}),
     "features.trip_start_hour.missing.fill", "whole number"),
    ("missing without fill", _set("features.company.missing", {"indicator": True}),
     "features.company.missing.fill", "is required"),
    ("unknown missing key", _set("features.company.missing", {"fill": "", "impute": "mode"}),
     "features.company.missing.impute", "unknown key"),
    ("indicator not a bool", _set("features.company.missing", {"fill": "", "indicator": "yes"}),
     "features.company.missing.indicator", "must be bool"),
    ("zero oov_buckets", _set("features.company.oov_buckets", 0), "features.company.oov_buckets",
     "must be positive, got 0"),
    ("negative oov_buckets", _set("features.payment_type.oov_buckets", -2), "features.payment_type.oov_buckets",
     "must be positive, got -2"),
    ("zero top_k", _set("features.company.top_k", 0), "features.company.top_k", "must be positive"),
    ("zero buckets", _set("features.pickup_latitude.buckets", 0), "features.pickup_latitude.buckets",
     "must be positive"),
    ("negative hash_buckets", _set("features.pickup_census_tract.hash_buckets", -1),
     "features.pickup_census_tract.hash_buckets", "must be positive"),
    ("float oov_buckets", _set("features.company.oov_buckets", 1.5), "features.company.oov_buckets", "must be int"),
    ("bool top_k", _set("features.company.top_k", True), "features.company.top_k", "must be int"),
    ("required not a bool", _set("features.company.required", "yes"), "features.company.required", "must be bool"),
    ("label column also a feature", _set("label_columns.fare", {"type": "float"}), "label_columns.fare",
     "is also a feature"),
    ("multiclass with 2 classes", _multiclass_label(["cash", "card"]), "label.classes", "at least 3"),
    ("multiclass with no classes", _multiclass_label([]), "label.classes", "at least 3"),
    ("multiclass with duplicate classes", _multiclass_label(["cash", "card", "cash"]), "label.classes",
     "duplicates"),
    ("binary with 3 classes", _set("label.classes", ["a", "b", "c"]), "label.classes", "2 classes"),
    ("derived label on a multiclass task", _set("task", "multiclass"), "label.derive", "task must be binary"),
    ("derived label on a regression task", _set("task", "regression"), "label.derive", "task must be binary"),
    ("regression with classes", lambda r: r.update(task="regression", label={
        "name": "tip", "column": "tips", "classes": ["a"]}), "label.classes", "no classes"),
    ("regression on a string column", lambda r: r.update(task="regression", label_columns={
        "grade": {"type": "string"}}, label={"name": "pay", "column": "grade"}), "label.column",
     "numeric label column"),
    ("label column that is also a feature", lambda r: r.update(task="regression", label={
        "name": "f", "column": "fare"}), "label.column", "is a feature"),
    ("label column not declared", _set("label", {"name": "tipped", "column": "tip_pct"}), "label.column",
     "'tip_pct' is not declared"),
    ("label with column and derive", _set("label.column", "tips"), "label", "exactly one"),
    ("label with neither column nor derive", lambda r: r["label"].pop("derive"), "label", "exactly one"),
    ("label name clashes with a column", _set("label.name", "fare"), "label.name", "clashes"),
    ("unknown label key", _set("label.threshold", 0.2), "label.threshold", "unknown key"),
    ("derive from an undeclared column", _set("label.derive.column", "tip"), "label.derive.column",
     "'tip' must be a numeric column"),
    ("derive from a string column", _set("label.derive.other", "company"), "label.derive.other",
     "must be a numeric column"),
    ("derive with an unknown op", _set("label.derive.op", "=="), "label.derive.op", "is not one of >, >=, < or <="),
    ("derive with a string scale", _set("label.derive.scale", "20%"), "label.derive.scale", "must be float"),
    ("unknown derive key", _set("label.derive.offset", 1), "label.derive.offset", "unknown key"),
    ("slice naming an undeclared column", _set("slices", [["payment_type"], ["pickup_zone"]]), "slices[1]",
     "'pickup_zone' is not a declared column"),
    ("slice as a bare undeclared name", _set("slices", ["pickup_zone"]), "slices[0]", "'pickup_zone'"),
    ("empty slice", _set("slices", [[]]), "slices[0]", "must be a feature name"),
    ("slices not a list", _set("slices", "payment_type"), "slices", "must be list"),
    ("threshold with no bound", _set("thresholds.AUC", {}), "thresholds.AUC", "sets none of lower, upper, change"),
    ("threshold with null bounds", _set("thresholds.AUC", {"lower": None, "upper": None}), "thresholds.AUC",
     "sets none"),
    ("threshold not a mapping", _set("thresholds.AUC", 0.9), "thresholds.AUC", "must be a mapping"),
    ("unknown threshold key", _set("thresholds.AUC", {"min": 0.9}), "thresholds.AUC.min", "unknown key"),
    ("string threshold bound", _set("thresholds.AUC", {"lower": "0.9"}), "thresholds.AUC.lower", "must be float"),
    ("schedule stage with batch_size 0", _schedule_stage(1, batch_size=0), "training.schedule[1].batch_size", "must be positive"),
    ("schedule stage with epochs 0", _schedule_stage(0, epochs=0), "training.schedule[0].epochs", "must be positive"),
    ("schedule stage with negative learning rate", _schedule_stage(0, learning_rate=-0.1),
     "training.schedule[0].learning_rate", "must be positive, got -0.1"),
    ("schedule stage with infinite learning rate", _schedule_stage(0, learning_rate=float("inf")),
     "training.schedule[0].learning_rate", "must be a finite number"),
    ("schedule stage without epochs", lambda r: r["training"]["schedule"][1].pop("epochs"),
     "training.schedule[1].epochs", "is required"),
    ("schedule stage with float batch_size", _schedule_stage(1, batch_size=256.0),
     "training.schedule[1].batch_size", "must be int"),
    ("unknown schedule stage key", _schedule_stage(0, momentum=0.9), "training.schedule[0].momentum",
     "unknown key"),
    ("schedule stage not a mapping", _set("training.schedule", [[0.001, 128, 5]]), "training.schedule[0]",
     "must be a mapping"),
    ("unknown strategy type", _set("training.strategy", {"type": "horovod"}),
     "training.strategy.type", "'horovod' is not one of"),
    ("unknown served use", _set("served", {"use": "ipw"}), "served.use", "'ipw' is not one of"),
    ("served column is a feature", _set("served", {"use": "holdback_only", "policy_column": "fare"}),
     "served.policy_column", "never become model inputs"),
    ("served columns are one", _set("served", {"use": "inverse_propensity", "propensity_column": "policy"}),
     "served.propensity_column", "also the policy_column"),
    ("unknown training key", _set("training.epochs", 3), "training.epochs", "unknown key"),
    ("seed not an int", _set("training.seed", "42"), "training.seed", "must be int"),
    ("deterministic not a bool", _set("training.deterministic", 1), "training.deterministic", "must be bool"),
    ("cross of an undeclared feature", _set("crosses", {"pay_x_zone": {"features": ["payment_type", "zone"]}}),
     "crosses.pay_x_zone.features", "'zone' is not a feature"),
    ("cross of a label column", _set("crosses", {"pay_x_tips": {"features": ["payment_type", "tips"]}}),
     "crosses.pay_x_tips.features", "'tips' is not a feature"),
    ("cross of one feature", _set("crosses", {"pay": {"features": ["payment_type"]}}), "crosses.pay.features",
     "at least 2"),
    ("cross of a feature twice", _set("crosses", {"pp": {"features": ["payment_type", "payment_type"]}}),
     "crosses.pp.features", "names a feature twice"),
    ("cross of a feature without ids", lambda r: r.update(crosses={"pay_x_p": {"features": ["payment_type", "p"]}},
                                                          features={**r["features"], "p": {"type": "float",
                                                                                           "transform": "zscore"}}),
     "crosses.pay_x_p.features", "add one of vocabulary, bucketize, hash to features.p.transform"),
    ("cross named like a model input", _set("crosses", {"fare_bucketize": {"features": ["payment_type", "company"]}}),
     "crosses.fare_bucketize", "give the cross another name"),
    ("cross with zero hash_buckets", _set("crosses", {"pc": {"features": ["payment_type", "company"],
                                                             "hash_buckets": 0}}),
     "crosses.pc.hash_buckets", "must be positive"),
    ("wide not a bool", _set("training.wide", "yes"), "training.wide", "must be bool"),
    ("tuning an unknown key", _set("tuning", {"search_space": {"dropout": [0.1]}}), "tuning.search_space.dropout",
     "cannot be tuned (tunable: learning_rate, embedding_dim, hidden_units, wide)"),
    ("tuning with no value to try", _set("tuning", {"search_space": {"embedding_dim": []}}),
     "tuning.search_space.embedding_dim", "give one or more"),
    ("tuning a bad value", _set("tuning", {"search_space": {"hidden_units": [[64, 32], [0]]}}),
     "tuning.search_space.hidden_units", "a list of positive whole numbers, got [0]"),
    ("tuning a negative learning rate", _set("tuning", {"search_space": {"learning_rate": [0.01, -1]}}),
     "tuning.search_space.learning_rate", "a positive number, got -1"),
    ("tuning with nothing to search", _set("tuning", {"search_space": {}}), "tuning.search_space", "at least 1"),
    ("tuning with zero trials", _set("tuning", {"search_space": {"wide": [True, False]}, "trials": 0}),
     "tuning.trials", "must be positive"),
    ("missing name", lambda r: r.pop("name"), "name", "is required"),
]


@pytest.mark.parametrize("mutate,key,fragment", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_spec_names_the_key(taxi_raw, mutate, key, fragment):
    message = _parse_error(_mutated(taxi_raw, mutate))
    assert _names_key(message, key), message
    assert fragment in message, message


def test_spec_not_a_mapping():
    assert _names_key(_parse_error(["name", "taxi"]), "<top level>")
    assert _names_key(_parse_error(None), "<top level>")


def test_spec_error_is_a_value_error():
    assert issubclass(SpecError, ValueError)


def test_load_names_the_file_when_it_is_missing(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match=re.escape(path)):
        feature_spec.load(path)


def test_load_reports_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match=re.escape(f"{path}: not valid YAML")):
        feature_spec.load(str(path))


def test_load_passes_its_path_as_source(tmp_path, taxi_raw):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_mutated(taxi_raw, _set("features.company.transform", "onehot"))))
    with pytest.raises(SpecError) as info:
        feature_spec.load(str(path))
    assert str(info.value).startswith(f"{path}: features.company.transform: ")


def test_load_names_the_line_of_the_key_at_fault(tmp_path, taxi_raw):
    path = tmp_path / "spec.yaml"
    text = yaml.safe_dump(_mutated(taxi_raw, _set("features.fare.type", "double")), sort_keys=True)
    path.write_text(text)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if t.strip() == "type: double")
    with pytest.raises(SpecError) as info:
        feature_spec.load(str(path))
    assert str(info.value) == (f"{path}: features.fare.type: 'double' is not one of int, float or string "
                               f"({path}:{line})")


# --- checking a spec against its CSV data --------------------------------------------------

SMALL_SPEC = {
    "name": "small",
    "data": {"path": "PLACEHOLDER"},
    "task": "binary",
    "label": {"name": "is_big", "column": "big"},
    "label_columns": {"big": {"type": "int", "missing": {"fill": 0}}},
    "features": {
        "count": {"type": "int", "transform": "zscore"},
        "price": {"type": "float", "transform": "log", "missing": {"fill": 0.0, "indicator": True}},
        "city": {"type": "string", "transform": "vocabulary"},
    },
}


def _small_spec(data_path) -> FeatureSpec:
    raw = copy.deepcopy(SMALL_SPEC)
    raw["data"]["path"] = str(data_path)
    return feature_spec.parse(raw, source=SOURCE)


def _write_csv(path, text):
    path.write_text(text)
    return path


def test_check_accepts_matching_data_with_empty_cells(tmp_path):
    _write_csv(tmp_path / "a.csv", "count,price,city,big,extra\n"
                                   "3,1.5,paris,1,x\n"
                                   ",,,0,\n"            # every feature empty: missing values are fine
                                   "7,,lyon,0,y\n"
                                   "4,2\n")            # a short row: the absent cells count as empty
    feature_spec.check_against_data(_small_spec(tmp_path))


def test_check_accepts_ints_in_a_float_column(tmp_path):
    _write_csv(tmp_path / "a.csv", "count,price,city,big\n1,2,nice,0\n")
    feature_spec.check_against_data(_small_spec(tmp_path / "a.csv"))  # a single file as data.path


def test_check_missing_feature_column(tmp_path):
    path = _write_csv(tmp_path / "a.csv", "count,city,big\n1,paris,0\n")
    with pytest.raises(SpecError) as info:
        feature_spec.check_against_data(_small_spec(tmp_path))
    message = str(info.value)
    assert _names_key(message, "features.price"), message
    assert "'price'" in message and str(path) in message


def test_check_missing_label_column(tmp_path):
    path = _write_csv(tmp_path / "a.csv", "count,price,city\n1,2.0,paris\n")
    with pytest.raises(SpecError) as info:
        feature_spec.check_against_data(_small_spec(tmp_path))
    message = str(info.value)
    assert _names_key(message, "label_columns.big"), message
    assert "'big'" in message and str(path) in message


def test_check_missing_column_in_a_later_file(tmp_path):
    _write_csv(tmp_path / "a.csv", "count,price,city,big\n1,2.0,paris,0\n")
    bad = _write_csv(tmp_path / "b.csv", "count,price,big\n1,2.0,0\n")
    with pytest.raises(SpecError) as info:
        feature_spec.check_against_data(_small_spec(tmp_path))
    assert _names_key(str(info.value), "features.city") and str(bad) in str(info.value)


def test_check_non_numeric_value_in_an_int_column(tmp_path):
    path = _write_csv(tmp_path / "a.csv", "count,price,city,big\n"
                                          "1,2.0,paris,0\n"
                                          "2,3.0,lyon,1\n"
                                          "many,4.0,nice,0\n")
    with pytest.raises(SpecError) as info:
        feature_spec.check_against_data(_small_spec(tmp_path))
    message = str(info.value)
    assert _names_key(message, "features.count.type"), message
    assert "'many'" in message, message
    assert f"{path}:4" in message, message  # the header is line 1


@pytest.mark.parametrize("row,key,value", [
    ("1.5,2.0,paris,0", "features.count.type", "'1.5'"),       # a float in an int column
    ("1,n/a,paris,0", "features.price.type", "'n/a'"),          # text in a float column
    ("1,2.0,paris,yes", "label_columns.big.type", "'yes'"),     # text in a label column
])
def test_check_names_the_key_value_and_line_of_a_bad_value(tmp_path, row, key, value):
    path = _write_csv(tmp_path / "a.csv", f"count,price,city,big\n{row}\n")
    with pytest.raises(SpecError) as info:
        feature_spec.check_against_data(_small_spec(tmp_path))
    assert _names_key(str(info.value), key)
    assert value in str(info.value) and f"{path}:2" in str(info.value)


def test_check_only_reads_sample_rows(tmp_path):
    _write_csv(tmp_path / "a.csv", "count,price,city,big\n" + "1,2.0,paris,0\n" * 5 + "x,2.0,paris,0\n")
    spec = _small_spec(tmp_path)
    feature_spec.check_against_data(spec, sample_rows=5)
    with pytest.raises(SpecError, match=r"a\.csv:7"):
        feature_spec.check_against_data(spec, sample_rows=6)


def test_check_no_csv_at_data_path(tmp_path):
    (tmp_path / "notes.txt").write_text("no data here")
    with pytest.raises(SpecError) as info:
        feature_spec.check_against_data(_small_spec(tmp_path))
    assert _names_key(str(info.value), "data.path") and str(tmp_path) in str(info.value)
    with pytest.raises(SpecError, match="data.path"):
        feature_spec.check_against_data(_small_spec(tmp_path / "absent.csv"))


# --- the synthetic datasets and their configs ----------------------------------------------

SYNTHETIC = [
    ("synthetic_multiclass.yaml", datasets.write_multiclass_csv, "multiclass"),
    ("synthetic_regression.yaml", datasets.write_regression_csv, "regression"),
]


@pytest.mark.parametrize("config,write,task", SYNTHETIC, ids=[s[2] for s in SYNTHETIC])
def test_synthetic_config_matches_its_generated_data(tmp_path, config, write, task):
    spec = feature_spec.load(os.path.join(CONFIGS, config))
    assert spec.task == task
    assert spec.schema_path is None  # SchemaGen infers the schema
    assert spec.data_path == os.path.join(REPO_ROOT, "build", "data", config[:-len(".yaml")])
    write(str(tmp_path / "data.csv"))
    spec = dataclasses.replace(spec, data_path=str(tmp_path))
    feature_spec.check_against_data(spec)

    with open(tmp_path / "data.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 600
    assert sorted(rows[0]) == sorted(spec.columns)  # every column is declared and used
    assert spec.label.column in spec.label_columns and spec.label.column not in spec.features
    labels = [row[spec.label.column] for row in rows]
    assert all(labels)  # never missing
    if spec.label.classes:
        assert set(labels) == set(spec.label.classes)
    for name, feature in spec.features.items():
        empty = sum(row[name] == "" for row in rows)
        if feature.required:
            assert empty == 0, name  # the data gate fails a required column with a missing value
    assert any(row[name] == "" for row in rows for name in spec.features)  # missing values to fill
    assert spec.slices and spec.thresholds and spec.training.schedule


def test_synthetic_configs_together_use_every_transform_and_missing_policy():
    specs = [feature_spec.load(os.path.join(CONFIGS, c)) for c, _, _ in SYNTHETIC]
    features = [f for s in specs for f in s.features.values()]
    assert {f.transform for f in features} == set(feature_spec.TRANSFORMS)
    assert any(f.missing.fill == "mean" for f in features)
    assert any(f.missing.fill != "mean" for f in features)
    assert any(f.missing.indicator for f in features)
    assert {f.type for f in features} == set(feature_spec.TYPES)


def test_synthetic_multiclass_label_and_thresholds():
    spec = feature_spec.load(os.path.join(CONFIGS, "synthetic_multiclass.yaml"))
    assert spec.label.column == "segment"
    assert spec.label.classes == datasets.MULTICLASS_CLASSES
    assert spec.num_classes == 3
    assert [t.metric for t in spec.thresholds] == ["SparseCategoricalAccuracy"]
    assert spec.thresholds[0].lower > 1 / 3  # above the majority class


def test_synthetic_regression_label_and_thresholds():
    spec = feature_spec.load(os.path.join(CONFIGS, "synthetic_regression.yaml"))
    assert spec.label.column == "delivery_hours" and spec.label.classes == ()
    assert spec.num_classes == 1
    assert {t.metric for t in spec.thresholds} == {"MeanAbsoluteError", "RootMeanSquaredError"}
    assert all(t.upper is not None and t.lower is None for t in spec.thresholds)


def test_synthetic_thresholds_name_metrics_the_evaluator_computes():
    # components.evaluation imports TFMA; its METRICS table is copied here to keep this file fast.
    computed = {"multiclass": {"ExampleCount", "SparseCategoricalAccuracy", "AUC", "Precision", "Recall"},
                "regression": {"ExampleCount", "MeanAbsoluteError", "RootMeanSquaredError", "MeanLabel",
                               "MeanPrediction"}}
    for config, _, task in SYNTHETIC:
        spec = feature_spec.load(os.path.join(CONFIGS, config))
        assert {t.metric for t in spec.thresholds} <= computed[task], config


@pytest.mark.parametrize("write", [datasets.write_multiclass_csv, datasets.write_regression_csv],
                         ids=["multiclass", "regression"])
def test_synthetic_data_is_deterministic(tmp_path, write):
    a, b, c = (write(str(tmp_path / name), rows=200, seed=seed) for name, seed in
               (("a.csv", 3), ("b.csv", 3), ("c.csv", 4)))
    text = [open(p).read() for p in (a, b, c)]
    assert text[0] == text[1] and text[0] != text[2]
    lines = text[0].splitlines()
    assert len(lines) == 201
    assert ",," in text[0] or any(line.startswith(",") or line.endswith(",") for line in lines)  # empty cells


# --- regressions: bugs found in components/feature_spec.py and fixed ----


def test_bug_string_label_column_needs_no_transform(taxi_raw):
    raw = _mutated(taxi_raw, lambda r: r.update(
        task="multiclass", label={"name": "kind", "column": "grade", "classes": ["a", "b", "c"]},
        label_columns={"grade": {"type": "string"}}))
    feature_spec.parse(raw, source=SOURCE)


def test_bug_int_vocabulary_column_without_missing_policy(taxi_raw):
    raw = _mutated(taxi_raw, _set("features.trip_start_hour", {"type": "int", "transform": "vocabulary"}))
    feature_spec.parse(raw, source=SOURCE)


NOT_SPEC_ERRORS = [
    # (id, mutation, what escaped before the fix)
    ("inf fill on an int vocabulary", _set("features.trip_start_hour.missing", {"fill": float("inf")}),
     OverflowError),  # int(inf) in _feature's whole-number check
    ("nan fill on an int vocabulary", _set("features.trip_start_hour.missing", {"fill": float("nan")}),
     ValueError),  # int(nan): a ValueError, but not a SpecError and it names no key
    ("nested slice list", _set("slices", [[["payment_type"]]]), TypeError),  # unhashable list in _slice
    ("schema not a string", _set("schema", 5), TypeError),  # resolve_path(5)
]


@pytest.mark.parametrize("mutate,escapes", [(m, e) for _, m, e in NOT_SPEC_ERRORS],
                         ids=[n for n, _, _ in NOT_SPEC_ERRORS])
def test_bug_malformed_values_escape_as_other_errors(taxi_raw, mutate, escapes):
    with pytest.raises(SpecError):
        feature_spec.parse(_mutated(taxi_raw, mutate), source=SOURCE)


def test_bug_float_vocabulary_is_accepted(taxi_raw):
    message = _parse_error(_mutated(taxi_raw, _set("features.fare.transform", "vocabulary")))
    assert _names_key(message, "features.fare.transform")


def test_bug_custom_config_round_trip_loses_replaced_fields(taxi, tmp_path):
    moved = dataclasses.replace(taxi, data_path=str(tmp_path))
    assert FeatureSpec.from_custom_config(moved.to_custom_config()) == moved


# --- the label's values against label.classes (README "Labels and classes") -----------------

PENGUIN_SPEC = {
    "name": "penguin",
    "data": {"path": "PLACEHOLDER"},
    "task": "multiclass",
    "label": {"name": "species_id", "column": "species", "classes": ["Adelie", "Chinstrap", "Gentoo"]},
    "label_columns": {"species": {"type": "string"}},
    "features": {"body_mass_g": {"type": "float", "transform": "zscore"}},
}


def _penguin_spec(tmp_path, classes, column_type="string", task="multiclass"):
    raw = copy.deepcopy(PENGUIN_SPEC)
    raw["data"]["path"] = str(tmp_path)
    raw["task"] = task
    raw["label"]["classes"] = classes
    raw["label_columns"]["species"]["type"] = column_type
    return feature_spec.parse(raw, source=SOURCE)


def _penguins(tmp_path, species):
    return _write_csv(tmp_path / "penguins.csv",
                      "species,body_mass_g\n" + "".join(f"{s},{3000 + i}\n" for i, s in enumerate(species)))


def test_class_names_matching_the_label_column_pass(tmp_path):
    _penguins(tmp_path, ["Adelie", "Gentoo", "Chinstrap", "Adelie"])
    feature_spec.check_against_data(_penguin_spec(tmp_path, ["Adelie", "Chinstrap", "Gentoo"]))


def test_a_misspelt_class_fails_up_front_with_did_you_mean(tmp_path):
    path = _penguins(tmp_path, ["Adelie", "Chinstrap", "Adelie", "Gentoo"])
    with pytest.raises(SpecError) as info:
        feature_spec.check_against_data(_penguin_spec(tmp_path, ["Adelie", "Chinstrap", "Gento"]))
    message = str(info.value)
    assert _names_key(message, "label.classes"), message
    assert f"'Gentoo' at {path}:5" in message  # the header is line 1
    assert "did you mean 'Gentoo' for 'Gento'?" in message, message


def test_a_label_value_far_from_every_class_asks_to_list_it(tmp_path):
    path = _penguins(tmp_path, ["Adelie", "Chinstrap", "Gentoo", "Emperor"])
    with pytest.raises(SpecError) as info:
        feature_spec.check_against_data(_penguin_spec(tmp_path, ["Adelie", "Chinstrap", "Gentoo"]))
    message = str(info.value)
    assert _names_key(message, "label.classes") and f"'Emperor' at {path}:5" in message
    assert "did you mean" not in message and "add it to label.classes" in message


def test_an_empty_label_cell_names_the_fill_that_is_not_a_class(tmp_path):
    _penguins(tmp_path, ["Adelie", "", "Gentoo", "Chinstrap"])
    with pytest.raises(SpecError) as info:
        feature_spec.check_against_data(_penguin_spec(tmp_path, ["Adelie", "Chinstrap", "Gentoo"]))
    assert "label_columns.species.missing.fill ('')" in str(info.value) and "penguins.csv:3" in str(info.value)


def test_integer_codes_of_a_multiclass_label_match_classes_by_text(tmp_path):
    _penguins(tmp_path, [1, 2, 3, 2])
    feature_spec.check_against_data(_penguin_spec(tmp_path, [1, 2, 3], column_type="int"))
    with pytest.raises(SpecError, match="'0' at .*penguins.csv:2"):  # classes are texts: a 0-based list is not 1-based data
        _penguins(tmp_path, [0, 1, 2])
        feature_spec.check_against_data(_penguin_spec(tmp_path, [1, 2, 3], column_type="int"))


def test_a_binary_label_coded_1_2_fails_with_the_fix_spelled_out(tmp_path):
    path = _penguins(tmp_path, [1, 2, 2, 1])
    with pytest.raises(SpecError) as info:
        feature_spec.check_against_data(_penguin_spec(tmp_path, ["male", "female"], column_type="int", task="binary"))
    message = str(info.value)
    assert _names_key(message, "label.classes") and f"holds 2 at {path}:3" in message, message
    assert "0 = 'male', 1 = 'female'" in message
    assert "declare label_columns.species.type: string" in message and "classes: [1, 2]" in message
    # The fix it names works: the codes read as text, in class order.
    feature_spec.check_against_data(_penguin_spec(tmp_path, [1, 2], task="binary"))
    _penguins(tmp_path, [0, 1, 1])  # and a 0/1 column is the ids themselves
    feature_spec.check_against_data(_penguin_spec(tmp_path, ["male", "female"], column_type="int", task="binary"))


def test_a_float_multiclass_label_is_refused_by_the_spec(tmp_path):
    with pytest.raises(SpecError) as info:
        _penguin_spec(tmp_path, [1, 2, 3], column_type="float")
    assert _names_key(str(info.value), "label_columns.species.type") and "int or string" in str(info.value)
