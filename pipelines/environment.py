"""The environment files (configs/local.yaml, configs/kubeflow.yaml): where a run's artifacts,
metadata and model repository live. The one reader of the local environment file; the runners
and the ops tools call it."""

from typing import Dict

import yaml

from components import feature_spec


def load_environment(path: str, spec) -> Dict:
    with open(feature_spec.resolve_path(path)) as f:
        raw = yaml.safe_load(f) or {}
    for key in ("pipeline_root", "metadata_path", "model_repository"):
        if key not in raw:
            raise feature_spec.SpecError(f"{path}: {key}: is required")
        raw[key] = feature_spec.resolve_path(raw[key].format(name=spec.name))
    return raw
