"""Skew and drift monitoring: TFDV statistics of served requests against training and last window.

    python -m ops.monitor --log build/prediction_log.sqlite --model taxi
        [--start ISO|unix] [--end ISO|unix] [--window_hours H]
        [--training_statistics PATH] [--schema PATH] [--thresholds JSON|FILE]
        [--out_dir build/monitor] [--retrain]

1. Reads the requests the proxy answered with HTTP 200 in [start, end) from the prediction log
   (--log: a SQLite file or a postgresql:// URL, see serving/logstore.py; shadow copies
   excluded) and turns each logged body into feature rows typed by the spec: an
   int sent as 5 or 5.0 stays INT, a missing value ("" for a string, NaN/null for a number, or an
   absent key) stays missing. TFDV computes their statistics in memory.
2. Validates them with TFDV against the training schema (SERVING environment); against the
   training statistics for skew (`skew_comparator`); and against the window of the same length
   just before for drift (`drift_comparator`), when that window has traffic. Categorical
   features (strings, and ints the spec feeds to a vocabulary or hash) are compared with the
   L-infinity distance of their value shares; numeric ones with the Jensen-Shannon divergence
   of their quantile histograms (equal-width histograms put nearly all of a long-tailed column
   such as `fare` in one bucket, so they see noise on clean data and miss a 3x shift).
3. Writes <out_dir>/<model>_monitor.json and .html (anomalies with comparator, value and
   threshold; every measurement; window bounds and row counts) and the served statistics.
4. Exits 1 when there are anomalies, 0 when there are none, 2 on usage or input errors, 3 when
   the monitor itself fails (so a crash never reads as "anomalies found").
5. With --retrain, starts a retraining run (`python -m pipelines.local_runner --spec ...
   --require_new_span`, or --retrain_command) when served data moved away from training (skew,
   drift, a vanished feature). Schema anomalies alone start nothing: retraining cannot fix
   malformed requests. Without --retrain_command, a spec whose data.path is one dataset (no
   {SPAN}) is refused before anything is read: that run would find no new span and stop. A
   newest span the pipeline's ML Metadata says was ingested already starts nothing either: the
   report says "nothing new to train on" (pipelines/span_window.require_new_span, the run's own rule).

Training statistics default to the StatisticsGen output of the run that produced the version
the `stable` label points at (else the latest pushed version), found through ML Metadata.
StatisticsGen runs without a schema, so it describes every int column as numeric; the category
counts of the spec's categorical ints are then computed from the same run's training examples.

Thresholds: the defaults below, updated by --thresholds (JSON text, or a JSON/YAML file holding
the block itself or under a `monitoring:` key):

    {"window_hours": 24, "min_values": 100,
     "skew":  {"infinity_norm": 0.1, "jensen_shannon_divergence": 0.25},
     "drift": {"infinity_norm": 0.1, "jensen_shannon_divergence": 0.25},
     "features": {"fare": {"skew": {"jensen_shannon_divergence": 0.3}}}}

A feature with fewer than `min_values` values on either side is not compared (TFDV's distances
over a handful of values are noise: taxi's `pickup_census_tract` has one value in 15,000 rows).
"""

import argparse
import copy
import datetime
import glob
import json
import logging
import math
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import yaml

from components import feature_spec
from components.values import coerce
from pipelines import mlmd, span_window
from serving import logstore

EXIT_OK, EXIT_ANOMALIES, EXIT_USAGE, EXIT_FAILURE = 0, 1, 2, 3
TRAINING, SERVING = "TRAINING", "SERVING"
INFINITY_NORM, JENSEN_SHANNON = "infinity_norm", "jensen_shannon_divergence"
COMPARATORS = (INFINITY_NORM, JENSEN_SHANNON)
CHECKS = ("skew", "drift")
# Measured on the taxi CSV (10,000 training rows, windows of 1,000 and 2,500 disjoint rows, 12
# random draws): clean traffic reaches L-inf 0.047 and JSD 0.14 at most; the shifted replay
# (Cash <-> Credit Card, fare x3) gives L-inf 0.33-0.36 on payment_type and JSD 0.48-0.62 on fare.
DEFAULT_THRESHOLDS: Dict[str, Any] = {
    "window_hours": 24.0,
    "min_values": 100,
    "skew": {INFINITY_NORM: 0.1, JENSEN_SHANNON: 0.25},
    "drift": {INFINITY_NORM: 0.1, JENSEN_SHANNON: 0.25},
    "features": {},
}
# Anomalies a retraining run can answer: the served data moved away from what the model learnt.
RETRAIN_KINDS = ("skew", "drift", "missing")


class MonitorError(RuntimeError):
    """A usage or input error; the message names the file, flag or key at fault (exit 2)."""


# --- thresholds ----------------------------------------------------------------------------------

def load_thresholds(spec: feature_spec.FeatureSpec, override: Optional[str] = None) -> Dict[str, Any]:
    """The defaults, updated by the spec's typed `monitoring:` block, then by --thresholds (checked by the same
    model, feature_spec.MonitoringConfig)."""
    thresholds = copy.deepcopy(DEFAULT_THRESHOLDS)
    if spec.monitoring is not None:
        _merge_thresholds(thresholds, spec.monitoring)
    if override:
        block, source, prefix = _read_override(override)
        try:
            _merge_thresholds(thresholds, feature_spec.parse_monitoring(block, source, spec, prefix))
        except feature_spec.SpecError as e:
            raise MonitorError(str(e)) from None
    return thresholds


def _read_override(text: str) -> Tuple[Any, str, Tuple[str, ...]]:
    if os.path.isfile(text):
        try:
            with open(text) as f:
                block = yaml.safe_load(f)  # YAML is a superset of JSON
        except (OSError, yaml.YAMLError) as e:
            raise MonitorError(f"--thresholds {text}: cannot read: {e}") from e
        if isinstance(block, Mapping) and "monitoring" in block:
            return block["monitoring"], text, ("monitoring",)
        return block, text, ()
    try:
        return json.loads(text), "--thresholds", ()
    except ValueError as e:
        raise MonitorError(f"--thresholds: neither a file nor JSON text ({e}): {text!r}") from e


def _merge_thresholds(thresholds: Dict[str, Any], block: feature_spec.MonitoringConfig) -> None:
    """Overlays the keys the block sets; what it leaves out keeps its current value."""
    given = block.model_dump(exclude_none=True)
    for key in ("window_hours", "min_values"):
        if key in given:
            thresholds[key] = given[key]
    for check in CHECKS:
        thresholds[check].update(given.get(check, {}))
    for name, per_check in given.get("features", {}).items():
        for check, comparators in per_check.items():
            thresholds["features"].setdefault(name, {}).setdefault(check, {}).update(comparators)


def _positive(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise MonitorError(f"{where}: must be a positive number, got {value!r}")
    return float(value)


def threshold_for(thresholds: Mapping[str, Any], feature: str, check: str, comparator: str) -> float:
    specific = thresholds["features"].get(feature, {}).get(check, {})
    return specific.get(comparator, thresholds[check][comparator])


# --- time windows --------------------------------------------------------------------------------

def parse_time(text: str, flag: str) -> float:
    """Unix seconds, or ISO 8601 (a time without an offset is UTC)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise MonitorError(f"{flag}: {text!r} is neither unix seconds nor an ISO 8601 time "
                           "(e.g. 2024-05-01T00:00:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def iso(ts: float) -> str:
    moment = datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def resolve_window(start: Optional[str], end: Optional[str], window_hours: Optional[float],
                   now: Optional[float] = None) -> Tuple[float, float]:
    """[start, end): both given; or one of them and the length; or the last window_hours to now."""
    if window_hours is not None and start is not None and end is not None:
        raise MonitorError("give at most two of --start, --end and --window_hours")
    length = None if window_hours is None else _positive(window_hours, "--window_hours") * 3600
    start_ts = None if start is None else parse_time(start, "--start")
    end_ts = None if end is None else parse_time(end, "--end")
    if start_ts is None and end_ts is None:
        end_ts = time.time() if now is None else now
    if start_ts is None:
        start_ts = end_ts - length
    elif end_ts is None:
        end_ts = start_ts + length
    if end_ts <= start_ts:
        raise MonitorError(f"--end ({iso(end_ts)}) must be after --start ({iso(start_ts)})")
    return start_ts, end_ts


# --- served rows ---------------------------------------------------------------------------------

class ServedRows:
    """Feature rows of the successful requests in one window, with what could not be read."""

    def __init__(self, window: Tuple[float, float]):
        self.window = window
        self.rows: List[Dict[str, List[Any]]] = []
        self.requests = 0
        self.other_status: Dict[int, int] = {}
        self.invalid: Dict[str, Dict[str, Any]] = {}  # feature -> {"count", "example"}
        self.unknown_keys: Dict[str, int] = {}

    def describe(self) -> Dict[str, Any]:
        return {"start": iso(self.window[0]), "end": iso(self.window[1]), "start_unix": self.window[0],
                "end_unix": self.window[1], "requests": self.requests, "rows": len(self.rows),
                "requests_not_counted": {str(k): v for k, v in sorted(self.other_status.items())}}


def read_served(log_url: str, model: str, window: Tuple[float, float],
                spec: feature_spec.FeatureSpec) -> ServedRows:
    served = ServedRows(window)
    try:
        for record in logstore.read_records(log_url, window[0], window[1], model):
            if record["status"] != 200:
                served.other_status[record["status"]] = served.other_status.get(record["status"], 0) + 1
                continue
            served.requests += 1
            body = record["request"] if isinstance(record["request"], dict) else {}
            for instance in logstore.instances(body):
                served.rows.append(_typed_row(instance, spec, served))
    except logstore.StoreError as e:
        raise MonitorError(f"--log: {e}") from e
    return served


def _typed_row(instance: Mapping[str, Any], spec: feature_spec.FeatureSpec, served: ServedRows) -> Dict[str, List[Any]]:
    row = {}
    for key, raw in instance.items():
        column = spec.columns.get(key)
        if column is None:
            served.unknown_keys[key] = served.unknown_keys.get(key, 0) + 1
            continue
        values = []
        for value in (raw if isinstance(raw, list) else [raw]):
            try:
                typed = coerce(value, column.type)
            except ValueError:
                problem = served.invalid.setdefault(key, {"count": 0, "example": repr(value)[:80]})
                problem["count"] += 1
                continue
            if typed is not None:
                values.append(typed)
        if values:
            row[key] = values
    return row


# --- statistics ----------------------------------------------------------------------------------

def categorical_ints(spec: feature_spec.FeatureSpec) -> List[str]:
    """Int features the model sees as categories (a vocabulary or a hash of the id)."""
    return [n for n, f in spec.features.items() if f.type == "int" and set(f.transforms) & {"vocabulary", "hash"}]


def is_categorical(spec: feature_spec.FeatureSpec, name: str) -> bool:
    return spec.features[name].type == "string" or name in categorical_ints(spec)


def statistics_options(spec: feature_spec.FeatureSpec, categorical: Optional[Iterable[str]] = None):
    """TFDV options that count the values of categorical ints (int_domain.is_categorical)."""
    import tensorflow_data_validation as tfdv
    from tensorflow_metadata.proto.v0 import schema_pb2

    schema = schema_pb2.Schema()
    for name in (categorical_ints(spec) if categorical is None else categorical):
        feature = schema.feature.add(name=name, type=schema_pb2.INT)
        feature.int_domain.is_categorical = True
    return tfdv.StatsOptions(schema=schema)


def record_batch(rows: Sequence[Mapping[str, List[Any]]], spec: feature_spec.FeatureSpec):
    """Arrow columns typed by the spec; a missing value is a null list, never NaN or ''."""
    import pyarrow as pa

    arrow_types = {"int": pa.int64(), "float": pa.float32(), "string": pa.binary()}
    present_labels = [n for n in spec.label_columns if n not in spec.features and any(n in r for r in rows)]
    names = list(spec.features) + present_labels
    arrays = [pa.array([row.get(name) for row in rows], type=pa.list_(arrow_types[spec.columns[name].type]))
              for name in names]
    return pa.RecordBatch.from_arrays(arrays, names)


def compute_statistics(rows: Sequence[Mapping[str, List[Any]]], spec: feature_spec.FeatureSpec,
                       categorical: Optional[Iterable[str]] = None):
    """DatasetFeatureStatisticsList of typed rows (as read_served or typed_rows produce them)."""
    from tensorflow_data_validation.statistics import stats_impl

    return stats_impl.generate_statistics_in_memory(record_batch(rows, spec), statistics_options(spec, categorical))


def typed_rows(instances: Iterable[Mapping[str, Any]], spec: feature_spec.FeatureSpec) -> List[Dict[str, List[Any]]]:
    """Raw feature dicts (request rows, or CSV rows as strings) as typed rows; raises on a bad value."""
    out = []
    for instance in instances:
        row = {}
        for key, value in instance.items():
            if key not in spec.columns:
                continue
            typed = coerce(value, spec.columns[key].type)
            if typed is not None:
                row[key] = [typed]
        out.append(row)
    return out


def _features(stats) -> Dict[str, Any]:
    dataset = _default_dataset(stats)
    return {".".join(f.path.step) if f.path.step else f.name: f for f in dataset.features}


def _default_dataset(stats):
    if not stats.datasets:
        raise MonitorError("statistics hold no dataset")
    for dataset in stats.datasets:
        if dataset.name in ("", "All Examples"):
            return dataset
    return stats.datasets[0]


def _value_count(feature) -> int:
    if feature.HasField("string_stats"):
        common = feature.string_stats.common_stats
    elif feature.HasField("num_stats"):
        common = feature.num_stats.common_stats
    else:
        return 0
    return int(common.tot_num_values or round(common.num_non_missing * common.avg_num_values))


def _has_category_counts(feature) -> bool:
    return feature.HasField("string_stats") and len(feature.string_stats.rank_histogram.buckets) > 0


# --- training statistics -------------------------------------------------------------------------

def load_statistics_file(path: str):
    """A FeatureStats.pb (binary), a one-record TFRecord or a text proto; a directory is an
    ExampleStatistics artifact (its Split-train is read)."""
    import tensorflow_data_validation as tfdv

    if os.path.isdir(path):
        path = os.path.join(path, "Split-train", "FeatureStats.pb")
    if not os.path.isfile(path):
        raise MonitorError(f"training statistics {path}: no such file")
    try:
        stats = tfdv.load_stats_binary(path)
    except Exception:
        stats = None
    if stats is None or not stats.datasets:  # not a binary proto: TFDV's loader tries TFRecord, then text
        try:
            stats = tfdv.load_statistics(path)
        except Exception as e:
            raise MonitorError(f"training statistics {path}: not a DatasetFeatureStatisticsList ({e})") from e
    if not stats.datasets or not stats.datasets[0].features:
        raise MonitorError(f"training statistics {path}: holds no feature statistics")
    return stats


def served_version(model_repository: str, model: str) -> int:
    """The version the `stable` label points at, else the latest complete version in the repository
    (a half-pushed one, still without saved_model.pb, is not served yet)."""
    from serving import model_config

    model_dir = os.path.join(model_repository, model)
    try:
        return model_config.label_version(model_repository, model, "stable")
    except model_config.ConfigError:
        pass  # no models.config, or no stable label yet
    latest = model_config.latest_complete(model_dir)
    if latest is None:
        raise MonitorError(f"{model_dir}: no pushed version and no `stable` label: pass --training_statistics, "
                           "or run the pipeline first")
    return latest


def pipeline_training_statistics(metadata_path: str, model_repository: str, model: str,
                                 version: Optional[int], spec: feature_spec.FeatureSpec):
    """(statistics, description) of the training split the served version was trained on."""
    from ops import release

    version = served_version(model_repository, model) if version is None else version
    try:
        evidence = release.lineage(metadata_path, model, version)
        statistics = mlmd.statistics_for_examples(mlmd.connect(metadata_path), evidence["examples"])
    except (release.ReleaseError, mlmd.MetadataError) as e:
        raise MonitorError(f"training statistics of {model} version {version} from {metadata_path}: {e}") from e
    stats = load_statistics_file(statistics.uri)
    described = {"source": "ml_metadata", "metadata": metadata_path, "model_version": version,
                 "path": os.path.join(statistics.uri, "Split-train", "FeatureStats.pb"),
                 "examples": evidence["examples"], "schema": evidence["schema"]}
    missing = [n for n in categorical_ints(spec) if n in _features(stats)
               and not _has_category_counts(_features(stats)[n])]
    if missing:
        stats = add_category_counts(stats, os.path.join(evidence["examples"], "Split-train"), missing, spec)
        described["category_counts_from_examples"] = missing
    return stats, described


def add_category_counts(stats, examples_dir: str, names: Sequence[str], spec: feature_spec.FeatureSpec):
    """Replaces the numeric statistics of `names` with categorical ones computed from the examples."""
    import tensorflow as tf
    from tfx_bsl.coders import example_coder

    files = sorted(glob.glob(os.path.join(examples_dir, "*")))
    if not files:
        raise MonitorError(f"{examples_dir}: no training examples to count the categories of {', '.join(names)}")
    compression = "GZIP" if files[0].endswith(".gz") else ""
    serialized = [r.numpy() for r in tf.data.TFRecordDataset(files, compression_type=compression)]
    batch = example_coder.ExamplesToRecordBatchDecoder().DecodeBatch(serialized)
    rows = []
    columns = {n: batch.column(batch.schema.get_field_index(n)).to_pylist() for n in names
               if batch.schema.get_field_index(n) >= 0}
    for i in range(batch.num_rows):
        rows.append({n: values[i] for n, values in columns.items() if values[i]})
    counted = _features(compute_statistics(rows, spec, categorical=names))
    result = copy.deepcopy(stats)
    dataset = _default_dataset(result)
    for feature in dataset.features:
        name = ".".join(feature.path.step) if feature.path.step else feature.name
        if name in names and name in counted:
            feature.CopyFrom(counted[name])
    return result


# --- validation ----------------------------------------------------------------------------------

def comparator_schema(schema, comparisons: Mapping[str, Mapping[str, str]], thresholds: Mapping[str, Any]):
    """A copy of the schema with a skew/drift comparator on each compared feature.

    comparisons: {check: {feature: comparator}}. Numeric features use quantile histograms."""
    from tensorflow_metadata.proto.v0 import schema_pb2

    result = copy.deepcopy(schema)
    by_name = {f.name: f for f in result.feature}
    for check, features in comparisons.items():
        for name, comparator in features.items():
            target = getattr(by_name[name], f"{check}_comparator")
            value = threshold_for(thresholds, name, check, comparator)
            if comparator == INFINITY_NORM:
                target.infinity_norm.threshold = value
            else:
                target.jensen_shannon_divergence.threshold = value
                target.jensen_shannon_divergence.source.type = schema_pb2.HistogramSelection.QUANTILES
    return result


def _plan(spec, schema, control, treatment, min_values: int, control_name: str,
          not_compared: Dict[str, str]) -> Dict[str, str]:
    """{feature: comparator} for features with enough values on both sides; notes the rest."""
    in_schema = {f.name for f in schema.feature}
    control_features, treatment_features = _features(control), _features(treatment)
    plan = {}
    for name in spec.features:
        if name not in in_schema:
            not_compared[name] = "not in the schema"
            continue
        left = _value_count(control_features[name]) if name in control_features else 0
        right = _value_count(treatment_features[name]) if name in treatment_features else 0
        if min(left, right) < min_values:
            not_compared[name] = (f"values: {left} in {control_name}, {right} served "
                                  f"(fewer than min_values={min_values})")
            continue
        plan[name] = INFINITY_NORM if is_categorical(spec, name) else JENSEN_SHANNON
    return plan


def _check_representation(spec, stats, where: str) -> None:
    """Training statistics must describe each feature the way the served ones will: category
    counts for a categorical feature, numeric statistics (histograms) for a numeric one."""
    features = _features(stats)
    wrong = []
    for name in spec.features:
        if name not in features or _value_count(features[name]) == 0:
            continue
        if is_categorical(spec, name) and not _has_category_counts(features[name]):
            wrong.append(f"{name} has no category counts (the spec treats it as categorical)")
        elif not is_categorical(spec, name) and not features[name].HasField("num_stats"):
            wrong.append(f"{name} has no numeric statistics (the spec treats it as numeric)")
    if wrong:
        raise MonitorError(f"{where}: {', '.join(wrong)}; compute them with ops.monitor.compute_statistics, "
                           "which marks the spec's vocabulary/hash ints categorical")


def _environment(schema, name: str) -> Optional[str]:
    return name if name in schema.default_environment else None


def validate(spec, schema, training, served, previous, thresholds) -> Dict[str, Any]:
    """Runs TFDV's checks; returns {"anomalies", "measurements", "not_compared"} for the report."""
    import tensorflow_data_validation as tfdv

    not_compared: Dict[str, Dict[str, str]] = {"skew": {}, "drift": {}}
    skew_plan = _plan(spec, schema, training, served, thresholds["min_values"], "training", not_compared["skew"])
    drift_plan = {} if previous is None else _plan(spec, schema, previous, served, thresholds["min_values"],
                                                   "the previous window", not_compared["drift"])
    anomalies: List[Dict[str, Any]] = []
    measurements: Dict[str, Dict[str, Any]] = {"skew": {}, "drift": {}}

    skew_schema = comparator_schema(schema, {"skew": skew_plan}, thresholds)
    skew = tfdv.validate_statistics(training, skew_schema, environment=_environment(schema, TRAINING),
                                    serving_statistics=served)
    _collect(skew, "skew", measurements, anomalies, comparator_reasons_only=True)

    serving_schema = comparator_schema(schema, {"drift": drift_plan}, thresholds)
    checked = tfdv.validate_statistics(served, serving_schema, environment=_environment(schema, SERVING),
                                       previous_statistics=previous)
    _collect(checked, "drift", measurements, anomalies, comparator_reasons_only=False)

    anomalies += _vanished(spec, training, served, thresholds["min_values"])
    return {"anomalies": sorted(anomalies, key=lambda a: (a["kind"], a["feature"] or "")),
            "measurements": measurements,
            "not_compared": {check: dict(sorted(notes.items())) for check, notes in not_compared.items()}}


def _vanished(spec, training, served, min_values: int) -> List[Dict[str, Any]]:
    """Features clients stopped sending: a skew that no distance between value distributions sees."""
    rows = _default_dataset(served).num_examples
    if rows < min_values:
        return []
    trained, sent = _features(training), _features(served)
    out = []
    for name in spec.features:
        in_training = _value_count(trained[name]) if name in trained else 0
        if in_training >= min_values and (name not in sent or _value_count(sent[name]) == 0):
            out.append({"feature": name, "kind": "missing", "comparator": None, "value": 0, "threshold": None,
                        "reason": "MISSING_IN_SERVING",
                        "description": f"no value in {rows} served rows; {in_training} values in training"})
    return out


def unseen_categories(spec, training, served) -> Dict[str, Dict[str, Any]]:
    """{categorical feature: {"count": served values never seen in the training statistics, "examples":
    the most frequent of them}}. A feature whose training statistics do not list every value (more
    distinct values than rank-histogram buckets) or that no served row carries is left out."""
    trained, sent = _features(training), _features(served)
    out = {}
    for name in spec.features:
        if not (is_categorical(spec, name) and name in trained and name in sent
                and _has_category_counts(trained[name]) and _has_category_counts(sent[name])):
            continue
        known = {b.label for b in trained[name].string_stats.rank_histogram.buckets}
        if trained[name].string_stats.unique > len(known):
            continue
        unseen = sorted(((b.sample_count, b.label) for b in sent[name].string_stats.rank_histogram.buckets
                         if b.label not in known), reverse=True)
        out[name] = {"count": int(sum(n for n, _ in unseen)), "examples": [label for _, label in unseen[:5]]}
    return out


def _collect(result, check: str, measurements, anomalies, comparator_reasons_only: bool) -> None:
    from tensorflow_metadata.proto.v0 import anomalies_pb2

    types = anomalies_pb2.DriftSkewInfo.Measurement.Type
    names = {types.L_INFTY: INFINITY_NORM, types.JENSEN_SHANNON_DIVERGENCE: JENSEN_SHANNON}
    for info in result.drift_skew_info:
        feature = ".".join(info.path.step)
        for m in (info.skew_measurements if check == "skew" else info.drift_measurements):
            if m.type in names:
                measurements[check][feature] = {"comparator": names[m.type], "value": round(m.value, 6),
                                                "threshold": round(m.threshold, 6)}
    reason_types = anomalies_pb2.AnomalyInfo.Type
    for feature, info in sorted(result.anomaly_info.items()):
        for reason in info.reason:
            type_name = reason_types.Name(reason.type)
            is_comparator = type_name.startswith("COMPARATOR_")
            if comparator_reasons_only and not is_comparator:
                continue  # the training data's own schema check is the data gate's job
            measured = measurements[check].get(feature, {}) if is_comparator else {}
            anomalies.append({"feature": feature, "kind": check if is_comparator else "schema",
                              "comparator": measured.get("comparator"), "value": measured.get("value"),
                              "threshold": measured.get("threshold"), "reason": type_name,
                              "description": reason.description or reason.short_description})
    for reason in ([] if comparator_reasons_only else result.dataset_anomaly_info.reason):
        anomalies.append({"feature": None, "kind": "schema", "comparator": None, "value": None, "threshold": None,
                          "reason": reason_types.Name(reason.type), "description": reason.description})


# --- report --------------------------------------------------------------------------------------

def write_report(report: Dict[str, Any], out_dir: str, served_stats, training_stats) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    model = report["model"]
    paths = {"json": os.path.join(out_dir, f"{model}_monitor.json"),
             "html": os.path.join(out_dir, f"{model}_monitor.html"),
             "served_statistics": os.path.join(out_dir, f"{model}_served_stats.pb")}
    report["files"] = paths
    with open(paths["served_statistics"], "wb") as f:
        f.write(served_stats.SerializeToString())
    with open(paths["json"], "w") as f:
        json.dump(report, f, indent=2)
    with open(paths["html"], "w") as f:
        f.write(_html(report, served_stats, training_stats))
    return paths


def _html(report: Dict[str, Any], served_stats, training_stats) -> str:
    """The monitor's page (pipelines.pages): anomalies, measurements, and served traffic's
    distributions beside training's."""
    from pipelines import pages
    from pipelines.report import statistics_section

    window, previous = report["window"], report["previous_window"]
    training = report["training_statistics"]
    facts = pages.definitions([
        ("window", f"[{window['start']}, {window['end']}): {window['rows']} rows from {window['requests']} "
                   "requests (HTTP 200)"),
        ("previous window", f"[{previous['start']}, {previous['end']}): {previous['rows']} rows"
         if previous["rows"] else "no traffic, drift not checked"),
        ("training statistics", f"{training.get('path')} ({training.get('num_examples')} examples)"),
        ("schema", report["schema"])])
    anomalies = report["anomalies"]
    parts = [facts, pages.section(
        f"{len(anomalies)} anomal{'y' if len(anomalies) == 1 else 'ies'}",
        pages.table(["feature", "kind", "comparator", "value", "threshold", "description"],
                    [[a["feature"] or "(dataset)", a["kind"], a["comparator"], a["value"], a["threshold"],
                      a["description"]] for a in anomalies], flagged=[True] * len(anomalies))
        if anomalies else "Served traffic is within every threshold of training and the previous window.",
        anchor="anomalies")]
    measured = report["measurements"]
    past_a_bound = {a["feature"] for a in anomalies if a["kind"] in ("skew", "drift")}
    names = sorted(set(measured["skew"]) | set(measured["drift"]))
    rows = []
    for name in names:
        skew, drift = measured["skew"].get(name, {}), measured["drift"].get(name, {})
        rows.append([name, skew.get("comparator") or drift.get("comparator"), skew.get("value"),
                     skew.get("threshold"), drift.get("value"), drift.get("threshold")])
    parts.append(pages.section("Measurements", pages.table(
        ["feature", "comparator", "skew", "skew threshold", "drift", "drift threshold"], rows,
        flagged=[name in past_a_bound for name in names]), anchor="measurements"))
    skipped = [[check, name, why] for check, notes in report["not_compared"].items() for name, why in notes.items()]
    if skipped:
        parts.append(pages.section("Not compared", pages.table(["check", "feature", "why"], skipped, row_headers=False)))
    unseen = {name: u for name, u in report.get("unseen_categories", {}).items() if u["count"]}
    parts.append(pages.section("Categories never seen in training", pages.table(
        ["feature", "served values", "examples"],
        [[name, u["count"], ", ".join(u["examples"])] for name, u in sorted(unseen.items())])
        if unseen else "Every served category of a vocabulary feature was seen in training.", anchor="unseen"))
    if report.get("retrain"):
        parts.append(pages.section("Retraining", pages.Markup("<pre>{}</pre>").format(
            json.dumps(report["retrain"], indent=2))))
    parts.append(statistics_section(served_stats.datasets[0], training_stats.datasets[0], "served", "training",
                                    "Distributions: served vs training"))
    return pages.document(f"Skew and drift of {report['model']}", *parts)


# --- retraining ----------------------------------------------------------------------------------

def retrain_command(spec_path: str, env_path: str, template: Optional[str] = None, **fields: str) -> List[str]:
    if template is None:
        return [sys.executable, "-m", "pipelines.local_runner", "--spec", spec_path, "--env", env_path,
                "--require_new_span"]  # never the same data again: only a span the model has not seen
    try:
        return [part.format(spec=spec_path, env=env_path, **fields) for part in shlex.split(template)]
    except (KeyError, ValueError) as e:
        raise MonitorError(f"--retrain_command: {e} (placeholders: {{spec}}, {{env}}, {{model}}, {{report}})") from e


def start_retraining(command: List[str], log_path: str, popen: Callable = subprocess.Popen) -> Dict[str, Any]:
    """Starts the run in its own session (it outlives this job); its output goes to log_path."""
    with open(log_path, "ab") as log:
        process = popen(command, cwd=feature_spec.REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL, start_new_session=True)
    return {"command": command, "pid": process.pid, "log": log_path}


# --- main ----------------------------------------------------------------------------------------

def run(args, popen: Callable = subprocess.Popen, now: Optional[float] = None) -> Tuple[int, Dict[str, Any]]:
    """One monitoring pass; returns (exit code, report). Raises MonitorError on usage/input errors."""
    try:
        spec = feature_spec.load(args.spec)
    except feature_spec.SpecError as e:
        raise MonitorError(str(e)) from e
    if args.model != spec.name:
        raise MonitorError(f"--model {args.model} does not match the spec {spec.source} (name: {spec.name})")
    if args.retrain and args.retrain_command is None and not spec.has_spans:
        raise MonitorError(f"--retrain: {spec.source}: data.path '{spec.data_path}' is one dataset, not spans: the "
                           "retraining run (pipelines.local_runner --require_new_span) would refuse it, exit 3, having "
                           "learnt nothing new. Monitor with a spans spec, whose data.path holds {SPAN} (e.g. "
                           "build/spans/span-{SPAN}/, what make export-span writes): make monitor RETRAIN=1 "
                           "SPEC=configs/my_taxi_spans.yaml; or leave out --retrain")
    thresholds = load_thresholds(spec, args.thresholds)
    window_hours = args.window_hours
    if window_hours is None and not (args.start and args.end):
        window_hours = thresholds["window_hours"]
    window = resolve_window(args.start, args.end, window_hours, now)
    try:
        log = logstore.masked_url(args.log)  # what reports and messages show: never the password
    except ValueError as e:
        raise MonitorError(f"--log: {e}") from e
    served = read_served(args.log, args.model, window, spec)
    if not served.rows:
        others = "; ".join(f"{n} with HTTP {s}" for s, n in sorted(served.other_status.items()))
        raise MonitorError(f"no successful (HTTP 200) request for model '{args.model}' in the window "
                           f"[{iso(window[0])}, {iso(window[1])}) of the prediction log {log}"
                           + (f" ({others} not counted)" if others else "")
                           + ": choose a window with traffic (--start/--end or --window_hours)")
    previous = read_served(args.log, args.model, (2 * window[0] - window[1], window[0]), spec)
    training, training_source = _training_statistics(args, spec)
    schema_path = args.schema or spec.schema_path or (
        os.path.join(training_source["schema"], "schema.pbtxt") if "schema" in training_source else None)
    if not schema_path:
        raise MonitorError(f"{spec.source} names no schema: pass --schema")
    schema = _load_schema(schema_path)

    served_stats = compute_statistics(served.rows, spec)
    previous_stats = compute_statistics(previous.rows, spec) if previous.rows else None
    result = validate(spec, schema, training, served_stats, previous_stats, thresholds)
    for name, problem in sorted(served.invalid.items()):
        result["anomalies"].append({
            "feature": name, "kind": "schema", "comparator": None, "value": problem["count"], "threshold": None,
            "reason": "INVALID_VALUE", "description": f"{problem['count']} values could not be read as "
            f"{spec.columns[name].type} (e.g. {problem['example']}); left out of the statistics"})
    report = {
        "model": args.model, "spec": spec.source, "log": log,
        "generated": iso(time.time() if now is None else now),
        "window": served.describe(), "previous_window": previous.describe(),
        "training_statistics": training_source, "schema": schema_path,
        "thresholds": thresholds, **result,
        "anomalous_features": sorted({a["feature"] for a in result["anomalies"] if a["feature"]}),
        "ignored_keys": served.unknown_keys,
        "unseen_categories": unseen_categories(spec, training, served_stats),
    }
    report["retrain"] = None
    write_report(report, args.out_dir, served_stats, training)
    if args.retrain:  # the report exists before the run that may read it ({report}) starts
        report["retrain"] = _retrain(args, spec, result["anomalies"], popen)
        write_report(report, args.out_dir, served_stats, training)
    return (EXIT_ANOMALIES if result["anomalies"] else EXIT_OK), report


def _training_statistics(args, spec) -> Tuple[Any, Dict[str, Any]]:
    if args.training_statistics:
        training = load_statistics_file(args.training_statistics)
        _check_representation(spec, training, f"training statistics {args.training_statistics}")
        source = {"source": "file", "path": args.training_statistics}
    else:
        env = _environment_file(args.env, spec)
        training, source = pipeline_training_statistics(
            args.metadata or env["metadata_path"], args.model_repository or env["model_repository"], args.model,
            args.model_version, spec)
    source["num_examples"] = int(_default_dataset(training).num_examples)
    return training, source


def _retrain(args, spec, anomalies: List[Dict[str, Any]], popen: Callable) -> Optional[Dict[str, Any]]:
    reasons = sorted({a["kind"] for a in anomalies if a["kind"] in RETRAIN_KINDS})
    if not reasons:
        return None if not anomalies else {
            "started": False, "reason": [],
            "why": "only schema anomalies: the requests break the schema, retraining cannot fix them"}
    if args.retrain_command is None:  # the run's own refusal (exit 3), asked before it is started, not after
        try:
            span_window.require_new_span(spec, _environment_file(args.env, spec))
        except span_window.NothingNew as e:
            return {"started": False, "reason": reasons, "why": f"nothing new to train on: {e}"}
    report_path = os.path.abspath(os.path.join(args.out_dir, f"{args.model}_monitor.json"))
    command = retrain_command(args.spec, args.env, args.retrain_command, model=args.model, report=report_path)
    log_path = os.path.abspath(os.path.join(args.out_dir, f"{args.model}_retrain.log"))
    try:
        return {"started": True, "reason": reasons, **start_retraining(command, log_path, popen)}
    except OSError as e:  # the anomalies still stand and are reported; the run did not start
        return {"started": False, "reason": reasons, "command": command, "why": f"cannot start: {e}"}


def _environment_file(path: str, spec) -> Dict[str, Any]:
    from pipelines.environment import load_environment

    try:
        return load_environment(path, spec)
    except OSError as e:
        raise MonitorError(f"--env {path}: cannot read: {e}") from e
    except (feature_spec.SpecError, yaml.YAMLError) as e:
        raise MonitorError(f"--env {path}: {e}") from e


def _load_schema(path: str):
    import tensorflow_data_validation as tfdv

    if not os.path.isfile(path):
        raise MonitorError(f"schema {path}: no such file")
    try:
        return tfdv.load_schema_text(path)
    except Exception as e:
        raise MonitorError(f"schema {path}: not a text Schema proto ({e})") from e


def print_summary(report: Dict[str, Any], stream=sys.stdout) -> None:
    window, previous = report["window"], report["previous_window"]
    print(f"monitor {report['model']}: [{window['start']}, {window['end']}) {window['rows']} rows from "
          f"{window['requests']} requests; training statistics {report['training_statistics'].get('path')}; "
          f"previous window {previous['rows']} rows" + ("" if previous["rows"] else " (drift not checked)"),
          file=stream)
    for a in report["anomalies"]:
        measured = f" {a['comparator']} {a['value']:.4f} > {a['threshold']}" if a.get("comparator") else ""
        print(f"  {a['kind']:7s} {a['feature'] or '(dataset)'}:{measured} {a['description']}", file=stream)
    if not report["anomalies"]:
        print("  no anomaly", file=stream)
    unseen = {n: u for n, u in report.get("unseen_categories", {}).items() if u["count"]}
    if unseen:
        print("  values never seen in training: " + "; ".join(
            f"{n} {u['count']} (e.g. {', '.join(map(repr, u['examples'][:3]))})" for n, u in sorted(unseen.items())),
            file=stream)
    retrain = report["retrain"]
    if retrain and retrain["started"]:
        print(f"  retraining started (pid {retrain['pid']}): {shlex.join(retrain['command'])}; log {retrain['log']}",
              file=stream)
    elif retrain:
        print(f"  retraining not started: {retrain['why']}", file=stream)
    print(f"report: {report['files']['json']} and {report['files']['html']}", file=stream)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log", default="build/prediction_log.sqlite",
                        help=f"the proxy's prediction log: {logstore.ACCEPTED_FORMS}")
    parser.add_argument("--model", default="taxi")
    parser.add_argument("--spec", help="feature spec (default: configs/<model>.yaml)")
    parser.add_argument("--env", default="configs/local.yaml", help="environment file: metadata and model repository")
    parser.add_argument("--start", help="window start: ISO 8601 (UTC unless an offset is given) or unix seconds")
    parser.add_argument("--end", help="window end (exclusive); default: now")
    parser.add_argument("--window_hours", type=float, help="window length (default: the thresholds' window_hours)")
    parser.add_argument("--training_statistics", help="a DatasetFeatureStatisticsList file (or an ExampleStatistics "
                        "directory) instead of the served version's StatisticsGen output from ML Metadata")
    parser.add_argument("--model_version", type=int, help="compare with this version's training data "
                        "(default: the `stable` label, else the latest pushed version)")
    parser.add_argument("--metadata", help="ML Metadata SQLite file (default: the environment file's)")
    parser.add_argument("--model_repository", help="default: the environment file's")
    parser.add_argument("--schema", help="training schema (default: the spec's schema)")
    parser.add_argument("--thresholds", help="JSON text, or a JSON/YAML file: the monitoring block "
                        "(see the module doc)")
    parser.add_argument("--out_dir", default="build/monitor")
    parser.add_argument("--retrain", action="store_true", help="start a retraining run when served data moved away "
                        "from training (skew, drift or a vanished feature); needs a spans spec (data.path with "
                        "{SPAN}) unless --retrain_command is given")
    parser.add_argument("--retrain_command", help="command to start instead of the local pipeline run; "
                        "placeholders {spec} {env} {model} {report}")
    return parser


def main(argv: Optional[Sequence[str]] = None, popen: Callable = subprocess.Popen,
         now: Optional[float] = None) -> int:
    args = build_parser().parse_args(argv)
    args.spec = args.spec or f"configs/{args.model}.yaml"
    try:
        code, report = run(args, popen=popen, now=now)
    except MonitorError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # never exit 1 for a crash: 1 means "anomalies found" to whoever schedules this
        logging.exception("monitor failed")
        print(f"error: the monitor failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    print_summary(report)
    return code


if __name__ == "__main__":
    sys.exit(main())
