"""The model repository's layout on disk, with no TF Serving protos: the part of serving/model_config.py
(its owner, which re-exports every name here) that the proxy's image can import.

Which folders are versions (`versions_on_disk`, TF Serving's rule), which of them are complete
(`complete_versions`, `is_complete`) and the serving spec beside a version (`read_serving_spec`);
the layout is drawn in model_config.py's docstring. Reading, checking and writing models.config
needs the protos and stays there.
"""

import json
import os
from typing import Any, Dict, List, Optional

MODEL_CONFIG_FILE = "models.config"
SAVED_MODEL_FILE = "saved_model.pb"
SERVING_SPEC_FILE = os.path.join("assets.extra", "serving_spec.json")  # written by the trainer


class ConfigError(ValueError):
    """models.config or a version's files cannot be used; the message names the file and the model or field."""


class _LocalFiles:
    """The file operations the layout needs, on local paths (tf.io.gfile offers the same names
    for gs:// and other remote file systems; training-side tools pass it as `fs`)."""

    listdir = staticmethod(os.listdir)
    isdir = staticmethod(os.path.isdir)
    exists = staticmethod(os.path.exists)
    GFile = staticmethod(open)


LOCAL_FILES = _LocalFiles()


def model_path(root: str, model: str) -> str:
    """<root>/<model>; a name that is not one folder name (empty, '.', '..', a separator) is refused,
    as it would reach outside the repository."""
    if model in ("", ".", "..") or "/" in model or os.sep in model or "\0" in model:
        raise ConfigError(f"model name {model!r} is not a folder name of the repository {root}")
    return os.path.join(root, model)


def version_path(base_path: str, version: int) -> str:
    return os.path.join(base_path, str(version))


def versions_on_disk(base_path: str, fs=LOCAL_FILES) -> List[int]:
    """Version folders under a model's base path: names that are whole numbers (TF Serving's
    file_system_storage_path_source.cc takes any child that parses as an int64)."""
    if not fs.isdir(base_path):
        return []
    out = []
    for name in fs.listdir(base_path):
        name = name.rstrip("/")  # tf.io.gfile lists remote folders with a trailing slash
        if name.isascii() and name.isdigit() and len(name) <= 18 and fs.isdir(os.path.join(base_path, name)):
            out.append(int(name))
    return sorted(out)


def is_complete(version_dir: str, fs=LOCAL_FILES) -> bool:
    """A version folder Pusher has finished: saved_model.pb, which it copies last, is there."""
    return bool(fs.exists(os.path.join(version_dir, SAVED_MODEL_FILE)))


def complete_versions(base_path: str, fs=LOCAL_FILES) -> List[int]:
    """Numeric version folders that are complete, oldest first (what a tool may pick)."""
    return [v for v in versions_on_disk(base_path, fs) if is_complete(version_path(base_path, v), fs)]


def latest_complete(base_path: str, fs=LOCAL_FILES) -> Optional[int]:
    versions = complete_versions(base_path, fs)
    return versions[-1] if versions else None


def read_serving_spec(version_dir: str, fs=LOCAL_FILES) -> Dict[str, Any]:
    """assets.extra/serving_spec.json of a version ({} for a model exported without one)."""
    path = os.path.join(version_dir, SERVING_SPEC_FILE)
    if not fs.exists(path):
        return {}
    with fs.GFile(path, "r") as f:
        text = f.read()
    try:
        spec = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{path}: not JSON ({e}); re-export the model (the trainer writes this file)") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: holds a {type(spec).__name__}, not an object; re-export the model")
    return spec
