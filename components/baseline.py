"""Baseline for the Evaluator: the latest blessed model other than this run's candidate, or the
version a person promoted to `stable` (what production serves).

TFX's LatestBlessedModelStrategy resolves before the Trainer runs and knows nothing of the
candidate. On a rerun with unchanged data the cached Trainer returns the model that was
blessed last time, so the Evaluator would compare a model with itself, miss its cache (its
inputs now include a baseline) and evaluate two models for nothing. Taking the candidate
as an input both orders the resolver after the Trainer and lets it be left out.
"""

import logging
from typing import Dict, List

from tfx import types
from tfx.dsl.components.common import resolver
from tfx.dsl.input_resolution.strategies.latest_blessed_model_strategy import LatestBlessedModelStrategy

from pipelines import mlmd
from serving import model_config

MODEL, BLESSING, CANDIDATE = "model", "model_blessing", "candidate"


class BaselineModelStrategy(LatestBlessedModelStrategy):
    """Inputs: model (all models), model_blessing (all blessings), candidate (this run's model)."""

    def resolve_artifacts(self, store, input_dict: Dict[str, List[types.Artifact]]):
        candidate = list(input_dict.get(CANDIDATE, []))
        candidate_ids = {a.id for a in candidate}
        models = [m for m in input_dict.get(MODEL, []) if m.id not in candidate_ids]
        blessings = list(input_dict.get(BLESSING, []))
        result = {MODEL: [], BLESSING: []}
        if models and blessings:
            result = self._resolve({MODEL: models, BLESSING: blessings}, MODEL, BLESSING)
        result[CANDIDATE] = candidate
        return result


class StableModelStrategy(resolver.ResolverStrategy):
    """The model behind the version models.config labels `label` (default stable), found through
    the lineage of its push; no baseline before the first promotion. Inputs as BaselineModelStrategy."""

    def __init__(self, model_repository: str, model_name: str, label: str = "stable"):
        self.model_repository, self.model_name, self.label = model_repository, model_name, label

    def resolve_artifacts(self, store, input_dict: Dict[str, List[types.Artifact]]):
        result = {MODEL: [], BLESSING: [], CANDIDATE: list(input_dict.get(CANDIDATE, []))}
        try:
            version = model_config.label_version(self.model_repository, self.model_name, self.label)
            evidence = mlmd.lineage_in(store, self.model_name, version)
        except (model_config.ConfigError, OSError, mlmd.MetadataError) as e:
            logging.info("no '%s' baseline yet (%s): change thresholds are skipped", self.label, e)
            return result
        candidate_ids = {a.id for a in result[CANDIDATE]}  # a cached rerun of the stable model: nothing to compare
        models = [m for m in input_dict.get(MODEL, []) if m.uri == evidence["model"] and m.id not in candidate_ids]
        blessings = [b for b in input_dict.get(BLESSING, []) if b.uri == evidence["blessing"]]
        if models and blessings:
            result[MODEL], result[BLESSING] = models[-1:], blessings[-1:]
        return result
