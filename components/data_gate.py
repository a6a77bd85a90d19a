"""Data gate: halts the run before Transform and Trainer when the data has anomalies, or (with
spans) when the new span drifted from the previous one past the spec's monitoring.span_drift bounds.

ExampleValidator only records anomalies; this component reads them (and checks the
statistics against the types the feature spec declares, which matters when the schema
is inferred from the very data being checked) and fails the run with a message that
names each feature and why.
"""

import json
import logging
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import tensorflow as tf
from tensorflow_metadata.proto.v0 import anomalies_pb2, statistics_pb2
from tfx.dsl.io import fileio
from tfx.dsl.component.experimental.annotations import InputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component
from tfx.types import artifact_utils
from tfx.types.standard_artifacts import ExampleAnomalies, ExampleStatistics, Schema

from components import feature_spec
from components.feature_spec import FeatureSpec
from components.spans import drifted, span_drift

_STATS_TYPES = {"int": statistics_pb2.FeatureNameStatistics.INT,
                "float": statistics_pb2.FeatureNameStatistics.FLOAT,
                "string": statistics_pb2.FeatureNameStatistics.STRING}


class DataGateError(RuntimeError):
    """The data failed validation; nothing downstream may run."""


def anomaly_problems(anomalies: anomalies_pb2.Anomalies) -> List[str]:
    problems = []
    for feature, info in sorted(anomalies.anomaly_info.items()):
        reasons = "; ".join(f"{r.short_description}: {r.description}" for r in info.reason)
        problems.append(f"feature '{feature}': {reasons or info.description}")
    for reason in anomalies.dataset_anomaly_info.reason:
        problems.append(f"dataset: {reason.short_description}: {reason.description}")
    return problems


def spec_problems(stats: statistics_pb2.DatasetFeatureStatisticsList, spec: FeatureSpec,
                  locate: Callable[[str], Optional[str]] = lambda name: None) -> List[str]:
    """Columns the spec declares that are absent or of another type in the statistics; `locate(column)`
    names the first value of a mistyped column that its type refuses (file, line and value)."""
    problems = []
    dataset = stats.datasets[0]
    seen = {f.path.step[0] if f.path.step else f.name: f for f in dataset.features}
    for name, feature in spec.columns.items():
        if name not in seen:
            problems.append(f"feature '{name}': missing column: the spec declares it, the data has none")
            continue
        stats_of = seen[name]
        kind = stats_of.WhichOneof("stats")
        common = getattr(stats_of, kind).common_stats if kind else None
        present = common.num_non_missing if common is not None else 0
        actual = stats_of.type
        # A column with no values at all has no type to check (CsvExampleGen calls it bytes).
        if present and actual != _STATS_TYPES[feature.type]:
            got = statistics_pb2.FeatureNameStatistics.Type.Name(actual)
            problems.append(locate(name) or f"feature '{name}': declared {feature.type} but the data holds {got} "
                                            f"values (a non-{feature.type} value somewhere in the column)")
        elif feature.required and common is not None:
            missing = common.num_missing
            if missing:
                problems.append(f"feature '{name}': required, but missing in {missing} rows")
    if spec.served is not None:
        problems += _propensity_problems(seen.get(spec.served.propensity_column), spec)
    return problems


def _propensity_problems(stats_of: Optional[statistics_pb2.FeatureNameStatistics], spec: FeatureSpec) -> List[str]:
    """A served row's propensity is the probability its answer had (the proxy logs it): in (0, 1].
    Transform weighs a row 1 / propensity and treats a value outside as "never served" (weight 1),
    because the serving graph feeds that column as 0; the gate refuses such data instead."""
    name = spec.served.propensity_column
    if stats_of is None or stats_of.WhichOneof("stats") is None:
        return []  # no span in the window was served: every row weighs 1
    if stats_of.WhichOneof("stats") != "num_stats" or stats_of.type == statistics_pb2.FeatureNameStatistics.STRING:
        return [f"served.propensity_column '{name}': the data holds text values; a propensity is a number in (0, 1] "
                "(make export-span writes it)"]
    numbers = stats_of.num_stats
    if numbers.common_stats.num_non_missing and (numbers.min <= 0 or numbers.max > 1):
        return [f"served.propensity_column '{name}': values from {numbers.min:g} to {numbers.max:g}; a propensity is "
                "the probability of the row's policy (serving/proxy.py), in (0, 1]: re-export the span from the "
                "prediction log (make export-span), or leave the cell empty for a row that was never served"]
    return []


def holdback_problems(stats: statistics_pb2.DatasetFeatureStatisticsList, spec: FeatureSpec) -> List[str]:
    """served.use holdback_only trains on the rows components/preprocessing.py's sample_weight weighs above
    0. When the training split's statistics count every value of the policy column and each weighs 0 (no
    row held back, none never served), Transform would analyse no row and the Trainer fit none: refused
    here. Only the newest span has statistics: with a window of older spans, which may hold such rows,
    a warning instead. Values past the statistics' histogram prove nothing: the Trainer counts them."""
    from components.preprocessing import no_row_held_back, sample_weight

    policy = spec.served.policy_column
    dataset = stats.datasets[0]
    stats_of = next((f for f in dataset.features if (f.path.step[0] if f.path.step else f.name) == policy), None)
    if stats_of is None or stats_of.WhichOneof("stats") != "string_stats":
        return []  # no span was served (every row weighs 1), or not the text the proxy logs
    strings = stats_of.string_stats
    counts = {b.label: int(b.sample_count) for b in strings.rank_histogram.buckets} or {
        v.value: int(v.frequency) for v in strings.top_values}
    if strings.common_stats.num_missing or sum(counts.values()) != strings.common_stats.num_non_missing:
        return []  # rows never served (weight 1), or values the statistics do not list
    weights = sample_weight(spec, {policy: tf.constant(list(counts))}, tf.constant(len(counts)))
    if any(float(w) > 0 for w in weights):
        return []
    listed = ", ".join(f"'{value}' {n}" for value, n in sorted(counts.items(), key=lambda item: -item[1]))
    problem = no_row_held_back(spec, dataset.num_examples, f"of the train split (its statistics: {listed})")
    if spec.has_spans and (spec.rolling_spans or 1) > 1:
        logging.warning("data gate: the newest span alone would leave nothing to train on; the window's older "
                        "spans must hold rows held back or never served, or the Trainer stops: %s", problem)
        return []
    return [problem]


def first_bad_value(spec: FeatureSpec, column: str) -> Optional[str]:
    """The first cell of `column` in the run's CSV files that its declared type refuses, as a problem line
    naming the file, line and value; None when the files cannot be read here or hold none."""
    try:
        bad = next(feature_spec.bad_values(spec, columns=[column]), None)
    except (OSError, feature_spec.SpecError):  # e.g. data on a store this process cannot glob
        return None
    return None if bad is None else bad.message(spec, source=False)


def _statistics(uri: str, split: str) -> statistics_pb2.DatasetFeatureStatisticsList:
    stats = statistics_pb2.DatasetFeatureStatisticsList()
    with fileio.open(os.path.join(uri, f"Split-{split}", "FeatureStats.pb"), "rb") as f:
        stats.ParseFromString(f.read())
    return stats


def measure_span_drift(statistics_uri: str, previous_uri: str, schema_uri: str, split: str,
                       spec: FeatureSpec) -> Tuple[List[Dict[str, Any]], Dict[str, str]]:
    """One split's span-to-span drift as the gate judges it: components.spans.span_drift of the statistics
    against the previous span's, under the schema, with the spec's monitoring.span_drift bounds ((measured,
    {feature: why not judged}); no bounds: nothing compared). The run's report calls it on the inputs ML
    Metadata recorded for the gate, so what a person reads is what the gate judged."""
    bounds = spec.monitoring.span_drift if spec.monitoring is not None else None
    if bounds is None:
        return [], {}
    from tfx.utils import io_utils

    schema = io_utils.SchemaReader().read(io_utils.get_only_uri_in_dir(schema_uri))
    return span_drift(_statistics(statistics_uri, split), _statistics(previous_uri, split), schema, bounds)


def find_problems(anomalies_uri: str, statistics_uri: str, split_names: List[str], spec: FeatureSpec,
                  previous_uri: str = None, schema_uri: str = None) -> List[str]:
    """Each problem once, with the splits it shows in ("[train, eval] ..."): CsvExampleGen types a column
    over the whole file, so one bad cell shows in every split. A located bad value comes first."""
    splits_of: Dict[str, List[str]] = {}
    located: Dict[str, Optional[str]] = {}
    drift_lines: List[str] = []  # per split by nature: each line carries its own split and figures

    def locate(name: str) -> Optional[str]:
        if name not in located:
            located[name] = first_bad_value(spec, name)
        return located[name]

    for split in split_names:
        anomalies = anomalies_pb2.Anomalies()
        with fileio.open(os.path.join(anomalies_uri, f"Split-{split}", "SchemaDiff.pb"), "rb") as f:
            anomalies.ParseFromString(f.read())
        stats = _statistics(statistics_uri, split)
        served = holdback_problems(stats, spec) if split == "train" and spec.served and \
            spec.served.use == "holdback_only" else []  # "train": the split the Trainer fits
        for problem in spec_problems(stats, spec, locate) + anomaly_problems(anomalies) + served:
            splits_of.setdefault(problem, []).append(split)
        if previous_uri and schema_uri:
            measured, unjudged = measure_span_drift(statistics_uri, previous_uri, schema_uri, split, spec)
            for m in measured:  # every compared feature, drifted or not: the run's log reports each
                logging.info("data gate: [%s] feature '%s' against the previous span: %s %.4f (bound %g)%s", split,
                             m["feature"], m["comparator"], m["value"], m["threshold"],
                             " DRIFTED" if m["drifted"] else "")
            for feature, why in unjudged.items():
                logging.info("data gate: [%s] feature '%s' not judged against the previous span: %s", split, feature,
                             why)
            drift_lines += drifted(measured, split)
    cause_first = sorted(splits_of, key=lambda p: p not in located.values())  # stable: the rest keep their order
    return [f"[{', '.join(splits_of[p])}] {p}" for p in cause_first] + drift_lines


@component
def DataGate(anomalies: InputArtifact[ExampleAnomalies], statistics: InputArtifact[ExampleStatistics],
             feature_spec: Parameter[str], previous_statistics: InputArtifact[ExampleStatistics] = None,
             schema: InputArtifact[Schema] = None) -> None:
    """Raises DataGateError (failing the run) when any split has an anomaly or drifted."""
    spec = FeatureSpec.from_custom_config(json.loads(feature_spec))
    splits = artifact_utils.decode_split_names(anomalies.split_names)
    problems = find_problems(anomalies.uri, statistics.uri, splits, spec,
                             previous_statistics.uri if previous_statistics is not None else None,
                             schema.uri if schema is not None else None)
    if problems:
        raise DataGateError("data gate: the data does not match the schema or the feature spec, or drifted from the "
                            "previous span; "
                            "nothing downstream runs:\n  " + "\n  ".join(problems))
