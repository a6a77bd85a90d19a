"""The model repository: its layout and TF Serving's ModelServerConfig, the one file both servers read.

    <root>/models.config                                   ModelServerConfig text proto (--model_config_file)
    <root>/<model>/<version>/                              numeric versions, as Pusher writes them
    <root>/<model>/<version>/saved_model.pb                written last: its presence makes a version complete
    <root>/<model>/<version>/assets.extra/serving_spec.json  what the trainer tells servers (classes, required)

This module owns the layout (its half that needs no protos, for the proxy's image, is
serving/repository_layout.py, re-exported here): which folders are versions (`versions_on_disk`, TF Serving's rule),
which of them are complete (`complete_versions`, `is_complete`: TFX's Pusher copies everything
but saved_model.pb first and saved_model.pb last, pusher/executor.py, so a version without it is
half-pushed), the serving spec beside a version (`read_serving_spec`) and the labels
(`repository_labels`, `label_version`). The server aspires every numeric folder as TF Serving does
and retries a load that finds no saved_model.pb; tools that pick a version take complete ones only.

`make promote` writes models.config (ops/release.py, through `write`); TF Serving's image
and the local server (`--model_config_file`) read it and re-read it every
`--model_config_file_poll_wait_seconds`. Labels live in its `version_labels`, nowhere else.
This module owns reading, checking and writing the file; callers never parse it themselves.

Semantics follow tensorflow_serving/config/model_server_config.proto and
file_system_storage_path_source.proto: a model without a version policy serves its latest
version (`latest { num_versions: 1 }`).
"""

import os
from typing import Dict, List, Optional

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

# The layout on disk lives in serving/repository_layout.py (no protos: the proxy's image imports it);
# this module re-exports it, so that callers know one owner.
from serving.repository_layout import (  # noqa: F401
    LOCAL_FILES, MODEL_CONFIG_FILE, SAVED_MODEL_FILE, SERVING_SPEC_FILE, ConfigError, complete_versions, is_complete,
    latest_complete, model_path, read_serving_spec, version_path, versions_on_disk)

ModelServerConfig = model_server_config_pb2.ModelServerConfig
ModelConfig = model_server_config_pb2.ModelConfig


def parse(text: str, source: str = MODEL_CONFIG_FILE) -> ModelServerConfig:
    config = ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise ConfigError(f"{source}: not a ModelServerConfig text proto: {e}") from None
    check(config, source)
    return config


def read(path: str) -> ModelServerConfig:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the model config: {e.strerror}") from None
    return parse(text, path)


def check(config: ModelServerConfig, source: str = MODEL_CONFIG_FILE) -> None:
    """The rules TF Serving applies when it takes a config (server_core.cc ValidateConfig and
    AddModelsViaModelConfigList): a model_config_list, unique names, a base path each."""
    if config.WhichOneof("config") == "custom_model_config":
        raise ConfigError(f"{source}: custom_model_config is not supported; use model_config_list")
    seen = set()
    for i, model in enumerate(config.model_config_list.config):
        where = f"{source}: model_config_list.config[{i}]"
        if not model.name:
            raise ConfigError(f"{where}: 'name' is empty")
        if model.name in seen:
            raise ConfigError(f"{where}: model name '{model.name}' appears twice")
        seen.add(model.name)
        if not model.base_path:
            raise ConfigError(f"{where} ('{model.name}'): 'base_path' is empty")
        if model.model_platform not in ("", "tensorflow"):
            raise ConfigError(f"{where} ('{model.name}'): model_platform '{model.model_platform}' is not "
                              f"supported (use 'tensorflow')")
        policy = model.model_version_policy
        if policy.WhichOneof("policy_choice") == "latest" and policy.latest.num_versions < 0:
            raise ConfigError(f"{where} ('{model.name}'): latest.num_versions must be positive")


def single_model(name: str, base_path: str, versions: Optional[List[int]] = None) -> ModelServerConfig:
    """What TF Serving builds from --model_name / --model_base_path (server.cc BuildSingleModelConfig);
    `versions` pins specific versions instead of the latest."""
    config = ModelServerConfig()
    model = config.model_config_list.config.add(name=name, base_path=base_path, model_platform="tensorflow")
    if versions:
        model.model_version_policy.specific.versions.extend(versions)
    return config


def aspired_versions(model: ModelConfig, on_disk: List[int]) -> List[int]:
    """The versions a model's policy asks for, given what is on disk."""
    policy = model.model_version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return list(on_disk)
    if choice == "specific":
        wanted = set(policy.specific.versions)
        return [v for v in on_disk if v in wanted]
    num = policy.latest.num_versions if choice == "latest" and policy.latest.num_versions else 1
    return sorted(on_disk)[-num:]


def labels(model: ModelConfig) -> Dict[str, int]:
    return dict(model.version_labels)


def find(config: ModelServerConfig, name: str) -> Optional[ModelConfig]:
    for model in config.model_config_list.config:
        if model.name == name:
            return model
    return None


def repository_labels(repository: str, model_name: str) -> Dict[str, int]:
    """The labels models.config gives a model ({} before the first promotion)."""
    path = os.path.join(repository, MODEL_CONFIG_FILE)
    if not os.path.exists(path):
        return {}
    model = find(read(path), model_name)
    return labels(model) if model is not None else {}


def label_version(repository: str, model_name: str, label: str) -> int:
    """The version a label of models.config points at (for tools that act on a released version)."""
    path = os.path.join(repository, MODEL_CONFIG_FILE)
    model = find(read(path), model_name)
    if model is None:
        raise ConfigError(f"{path}: no model '{model_name}' (promote a version first: make promote VERSION=n)")
    if label not in model.version_labels:
        raise ConfigError(f"{path}: model '{model_name}' has no label '{label}' "
                          f"(labels: {', '.join(sorted(model.version_labels)) or 'none'})")
    return int(model.version_labels[label])


def write(path: str, config: ModelServerConfig, header: str = "") -> str:
    """Writes the config whole (rename): a server's config poll never reads half a file."""
    check(config, path)
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp")
    with open(tmp, "w") as f:
        f.write(header + text_format.MessageToString(config))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
