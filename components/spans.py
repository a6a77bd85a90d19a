"""Span to span: the new span's statistics against the previous span's, with TFDV's drift
comparators and the bounds of the spec's `monitoring.span_drift` block (not the served-traffic
monitor's `monitoring.drift`: spans are cut by time, and their sizes differ from a served window's):
L-infinity for categorical features, Jensen-Shannon divergence over quantile histograms for numeric
ones. A feature with fewer than `min_values` values in either span, or listed under `ignore`, is not
judged, and said so. The data gate stops the run before Transform and the Trainer when a judged
feature drifts past its bound, naming the feature, the distance and the bound.
"""

from typing import Any, Dict, Iterable, List, Mapping, Tuple

from tfx import types
from tfx.dsl.components.common import resolver

STATISTICS, CURRENT, CACHE = "statistics", "current", "cache"


class PreviousSpanStatisticsStrategy(resolver.ResolverStrategy):
    """Inputs: statistics (every StatisticsGen output), current (this run's). Resolves the newest
    statistics of an earlier span (none on the first span); of a span ingested twice, the latest.

    A statistics artifact's span is the span it describes, as ML Metadata records it (pipelines/mlmd.py
    described_spans: the span of the Examples its StatisticsGen read): the `span` TFX 1.16 copies onto
    it is the Examples' declared property, which ExampleGen leaves 0. Without a store (or lineage),
    the declared span."""

    def resolve_artifacts(self, store, input_dict: Dict[str, List[types.Artifact]]):
        current = list(input_dict.get(CURRENT, []))
        candidates = list(input_dict.get(STATISTICS, []))
        span = self._spans(store, current + candidates)
        newest = max((span[a.id] for a in current if span[a.id] is not None), default=None)
        earlier = [a for a in candidates if newest is not None and span[a.id] is not None and span[a.id] < newest]
        best = max(earlier, key=lambda a: (span[a.id], a.id), default=None)
        return {STATISTICS: [best] if best is not None else [], CURRENT: current}

    @staticmethod
    def _spans(store, artifacts: List[types.Artifact]) -> Dict[int, int]:
        if store is None:
            return {a.id: a.span for a in artifacts}
        from pipelines import mlmd

        return mlmd.described_spans(store, [a.mlmd_artifact for a in artifacts])


class LatestAnalyzerCacheStrategy(resolver.ResolverStrategy):
    """Input: cache (every TransformCache). Resolves the newest, or none before Transform's first
    run (TFX's LatestArtifactStrategy fails the run when there is none)."""

    def resolve_artifacts(self, store, input_dict: Dict[str, List[types.Artifact]]):
        return {CACHE: sorted(input_dict.get(CACHE, []), key=lambda a: a.id)[-1:]}


def drift_measurements(statistics, previous, schema, thresholds: Mapping[str, float], skip: Iterable[str] = (),
                       per_feature: Mapping[str, Mapping[str, float]] = {}) -> List[Dict[str, Any]]:
    """Every compared feature's distance from the previous statistics, as TFDV computes it:
    {feature, comparator, value, threshold, drifted}, by feature name; the features in `skip` are not
    compared, those in `per_feature` have their own thresholds. Jensen-Shannon divergence reads quantile
    histograms, as ops/monitor.py's does: over TFDV's default equal-width histograms one long trip sets
    every bucket's width, and unshifted taxi spans of 2,500 rows differed by up to 0.69 (trip_miles) while
    fares x1.5 moved fare by as little as 0.07 (configs/taxi.yaml has the figures)."""
    import copy

    import tensorflow_data_validation as tfdv
    from tensorflow_metadata.proto.v0 import anomalies_pb2, schema_pb2

    schema, skip = copy.deepcopy(schema), set(skip)
    for feature in schema.feature:
        if feature.name in skip:
            continue
        bounds = {**thresholds, **per_feature.get(feature.name, {})}
        if feature.type == schema_pb2.BYTES and "infinity_norm" in bounds:
            feature.drift_comparator.infinity_norm.threshold = bounds["infinity_norm"]
        elif feature.type in (schema_pb2.INT, schema_pb2.FLOAT) and "jensen_shannon_divergence" in bounds:
            divergence = feature.drift_comparator.jensen_shannon_divergence
            divergence.threshold = bounds["jensen_shannon_divergence"]
            divergence.source.type = schema_pb2.HistogramSelection.QUANTILES
    anomalies = tfdv.validate_statistics(statistics, schema, previous_statistics=previous)
    return sorted(({"feature": ".".join(info.path.step),
                    "comparator": anomalies_pb2.DriftSkewInfo.Measurement.Type.Name(m.type),
                    "value": m.value, "threshold": m.threshold, "drifted": m.value > m.threshold}
                   for info in anomalies.drift_skew_info for m in info.drift_measurements),
                  key=lambda m: (m["feature"], m["comparator"]))


def value_counts(statistics) -> Dict[str, int]:
    """{feature: rows that hold a value} in the statistics' default slice (TFDV's own view of it)."""
    from tensorflow_data_validation.utils import stats_util

    view = stats_util.DatasetListView(statistics).get_default_slice_or_die()
    counts = {}
    for path in view.list_features():
        common = view.get_feature(path).common_statistics()
        counts[".".join(path.steps())] = int(common.num_non_missing) if common is not None else 0
    return counts


def span_drift(statistics, previous, schema, bounds) -> Tuple[List[Dict[str, Any]], Dict[str, str]]:
    """The new span against the previous one under the spec's monitoring.span_drift `bounds`:
    (drift_measurements of the judged features, {feature: why it is not judged})."""
    new, old = value_counts(statistics), value_counts(previous)
    unjudged = {}
    for feature in sorted(f.name for f in schema.feature):
        if feature in bounds.ignore:
            unjudged[feature] = "monitoring.span_drift.ignore lists it"
        elif bounds.min_values and min(new.get(feature, 0), old.get(feature, 0)) < bounds.min_values:
            unjudged[feature] = (f"n < min: {old.get(feature, 0)} values in the previous span, {new.get(feature, 0)} "
                                 f"in this one; monitoring.span_drift.min_values is {bounds.min_values}")
    given = bounds.model_dump(exclude_none=True)
    thresholds = {k: v for k, v in given.items() if k in ("infinity_norm", "jensen_shannon_divergence")}
    return drift_measurements(statistics, previous, schema, thresholds, skip=unjudged,
                              per_feature=given.get("features", {})), unjudged


def drift_problems(statistics, previous, schema, bounds, split: str = "train") -> List[str]:
    """One line per judged feature whose distance to the previous span is past its bound (TFDV computes it)."""
    return drifted(span_drift(statistics, previous, schema, bounds)[0], split)


def drifted(measurements: List[Dict[str, Any]], split: str = "train") -> List[str]:
    """drift_measurements' features past their bound, one problem line each, naming the distance and bound."""
    return sorted(f"[{split}] feature '{m['feature']}': drifted from the previous span: {m['comparator']} "
                  f"{m['value']:.4f} > {m['threshold']:g} (the spec's monitoring.span_drift)"
                  for m in measurements if m["drifted"])
