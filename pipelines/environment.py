"""The environment files (configs/local.yaml, configs/kubeflow.yaml): where a run's artifacts,
metadata and model repository live. One typed model per kind of file (pydantic, unknown keys
refused in both) and the one reader of each; the runners and the ops tools call it."""

from typing import Any, Dict, List, Optional

import pydantic

from components import feature_spec
from serving import typed_config

OBJECT_STORAGE = ("gs://", "s3://")


class EnvironmentFileError(feature_spec.SpecError):
    """An environment file that cannot be used; the message names the file, the key and its line."""


class _Environment(typed_config.StrictConfig):
    """What both runners read: locations ("{name}" is the spec's name), caching, Beam and the sandbox."""

    pipeline_root: str = pydantic.Field(min_length=1)
    model_repository: str = pydantic.Field(min_length=1)
    enable_cache: bool = True
    beam_profile: Optional[str] = pydantic.Field(None, description="a profile of configs/beam/")
    beam_args: List[str] = []
    beam_vars: Dict[str, Any] = {}
    # Checked by the sandbox's own settings model (components/sandbox.py), which owns its keys.
    sandbox: Dict[str, Any] = {}
    # One of pipelines/pipeline.py's BASELINES, checked there where the resolvers are built.
    baseline: Optional[str] = None


class LocalEnvironment(_Environment):
    """configs/local.yaml: paths on this machine, relative to the repository root."""
    metadata_path: str = pydantic.Field(min_length=1)


class KubeflowEnvironment(_Environment):
    """configs/kubeflow.yaml: every location in object storage, since each component runs in its own pod."""
    data_path: str = pydantic.Field(min_length=1)
    image: Optional[str] = pydantic.Field(None, description="the training image built from Dockerfile.train")


def _read(path: str, model: type, name: str) -> Dict[str, Any]:
    raw, lines, path = feature_spec.read_yaml(path, "environment file", EnvironmentFileError)
    try:
        env = model.model_validate(raw if raw is not None else {})
    except pydantic.ValidationError as e:
        raise EnvironmentFileError(typed_config.describe(e, model, path, lines)) from None
    values = env.model_dump()
    for key in ("pipeline_root", "metadata_path", "model_repository", "data_path"):
        if key in values:
            values[key] = _fill_name(values[key], name, key, path, lines.get((key,)))
    values["source"] = path
    return values


def _fill_name(value: str, name: str, key: str, path: str, line: Optional[int]) -> str:
    """A location with "{name}" filled in; any other placeholder is refused, naming the file, key and line."""
    at = f" ({path}:{line})" if line else ""
    if key == "data_path" and feature_spec.SPAN_TOKEN in value:
        # The spans come from the spec (kubeflow_runner.spec_for_image keeps its pattern under this folder).
        raise EnvironmentFileError(
            f"{path}: {key}: '{value}' holds {feature_spec.SPAN_TOKEN}, but the span pattern is the spec's "
            f"data.path (e.g. build/spans/span-{feature_spec.SPAN_TOKEN}/), kept under this folder: give the folder "
            f"that holds the span folders, with a trailing slash (e.g. gs://bucket/data/{{name}}/){at}")
    try:
        return value.format(name=name)
    except (KeyError, IndexError, ValueError) as e:
        what = f"'{{{e.args[0]}}}'" if isinstance(e, KeyError) else f"braces other than {{name}} ({e})"
        raise EnvironmentFileError(f"{path}: {key}: '{value}' has {what}: only {{name}}, the spec's name, is filled "
                                   f"in; remove the other placeholder{at}") from None


def load_environment(path: str, spec=None) -> Dict[str, Any]:
    """configs/local.yaml, checked, with "{name}" filled in (kept as is without a spec) and its paths made
    repo-relative."""
    values = _read(path, LocalEnvironment, spec.name if spec is not None else "{name}")
    for key in ("pipeline_root", "metadata_path", "model_repository"):
        values[key] = feature_spec.resolve_path(values[key])
    return values


def load_kubeflow_environment(path: str, spec) -> Dict[str, Any]:
    """configs/kubeflow.yaml, checked, with "{name}" filled in and every location checked to be object storage."""
    values = _read(path, KubeflowEnvironment, spec.name)
    for key in ("pipeline_root", "model_repository", "data_path"):
        if not values[key].startswith(OBJECT_STORAGE):
            raise EnvironmentFileError(f"{values['source']}: {key}: '{values[key]}' is not in object storage "
                                    f"({' or '.join(OBJECT_STORAGE)}): every component runs in its own pod and "
                                    f"reads what the others wrote from there")
    return values
