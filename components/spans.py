"""Span to span: the new span's statistics against the previous span's, with TFDV's drift
comparators, thresholds from the spec's `monitoring.drift` block (the same numbers the served-
traffic monitor uses): L-infinity for categorical features, Jensen-Shannon divergence for numeric
ones. The data gate stops the run before Transform and the Trainer when a feature drifts past
them, naming the feature, the distance and the bound.
"""

from typing import Any, Dict, List, Mapping

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


def drift_measurements(statistics, previous, schema, thresholds: Mapping[str, float]) -> List[Dict[str, Any]]:
    """Every compared feature's distance from the previous statistics, as TFDV computes it:
    {feature, comparator, value, threshold, drifted}, by feature name."""
    import copy

    import tensorflow_data_validation as tfdv
    from tensorflow_metadata.proto.v0 import anomalies_pb2, schema_pb2

    schema = copy.deepcopy(schema)
    for feature in schema.feature:
        if feature.type == schema_pb2.BYTES and "infinity_norm" in thresholds:
            feature.drift_comparator.infinity_norm.threshold = thresholds["infinity_norm"]
        elif feature.type in (schema_pb2.INT, schema_pb2.FLOAT) and "jensen_shannon_divergence" in thresholds:
            feature.drift_comparator.jensen_shannon_divergence.threshold = thresholds["jensen_shannon_divergence"]
    anomalies = tfdv.validate_statistics(statistics, schema, previous_statistics=previous)
    return sorted(({"feature": ".".join(info.path.step),
                    "comparator": anomalies_pb2.DriftSkewInfo.Measurement.Type.Name(m.type),
                    "value": m.value, "threshold": m.threshold, "drifted": m.value > m.threshold}
                   for info in anomalies.drift_skew_info for m in info.drift_measurements),
                  key=lambda m: (m["feature"], m["comparator"]))


def drift_problems(statistics, previous, schema, thresholds: Mapping[str, float], split: str = "train") -> List[str]:
    """One line per feature whose distance to the previous span is past its bound (TFDV computes it)."""
    return drifted(drift_measurements(statistics, previous, schema, thresholds), split)


def drifted(measurements: List[Dict[str, Any]], split: str = "train") -> List[str]:
    """drift_measurements' features past their bound, one problem line each, naming the distance and bound."""
    return sorted(f"[{split}] feature '{m['feature']}': drifted from the previous span: {m['comparator']} "
                  f"{m['value']:.4f} > {m['threshold']:g} (the spec's monitoring.drift)"
                  for m in measurements if m["drifted"])
