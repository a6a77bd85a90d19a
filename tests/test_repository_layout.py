"""The model repository layout has one owner (serving/model_config.py); every tool that picks a
version, reads labels or reads the serving spec agrees with it: numeric folders only, a
half-pushed version (no saved_model.pb yet: Pusher copies it last) is never picked, labels come
from models.config only."""

import json
import os

import pytest

from serving import model_config
from tests.conftest import write_models_config


def _push(root, model, version, complete=True, spec=None):
    folder = root / model / str(version)
    (folder / "variables").mkdir(parents=True)
    if spec is not None:
        (folder / "assets.extra").mkdir()
        (folder / "assets.extra" / "serving_spec.json").write_text(json.dumps(spec))
    if complete:
        (folder / "saved_model.pb").write_bytes(b"")
    return folder


@pytest.fixture
def repo(tmp_path):
    """taxi: 1 and 2 complete, 3 half-pushed; folders and files that are not versions."""
    _push(tmp_path, "taxi", 1)
    _push(tmp_path, "taxi", 2)
    _push(tmp_path, "taxi", 3, complete=False)
    for name in ("tmp-4", "5a", "\u0665", "-6"):  # "\u0665" is an Arabic-Indic 5: isdigit() but not ASCII
        _push(tmp_path, "taxi", name)
    (tmp_path / "taxi" / "7").write_text("a file, not a folder")
    return tmp_path


def test_versions_are_numeric_folders_and_complete_ones_have_saved_model_pb(repo):
    base = str(repo / "taxi")
    assert model_config.versions_on_disk(base) == [1, 2, 3]  # what TF Serving aspires
    assert model_config.complete_versions(base) == [1, 2]
    assert model_config.latest_complete(base) == 2
    assert not model_config.is_complete(os.path.join(base, "3"))
    assert model_config.versions_on_disk(str(repo / "nope")) == []
    assert model_config.latest_complete(str(repo / "nope")) is None


def test_tf_io_gfile_lists_the_same_versions(repo):
    import tensorflow as tf

    assert model_config.complete_versions(str(repo / "taxi"), tf.io.gfile) == [1, 2]


def test_every_tool_skips_the_half_pushed_version(repo, monkeypatch):
    from ops import batch_predict, monitor, parity, release

    repository = str(repo)
    assert monitor.served_version(repository, "taxi") == 2
    assert batch_predict.resolve_version(repository, "taxi") == 2
    with pytest.raises(batch_predict.BatchPredictError, match=r"version 3 is not pushed .*\(pushed: 1, 2\)"):
        batch_predict.resolve_version(repository, "taxi", 3)
    with pytest.raises(release.ReleaseError, match=r"taxi/3: no such complete version .*\(pushed: 1, 2\)"):
        release.promote(repository, str(repo / "metadata.sqlite"), "taxi", 3)

    picked = []

    def lineage(metadata, model, version):
        picked.append(version)
        raise LookupError("stop here")

    monkeypatch.setattr(release, "lineage", lineage)
    with pytest.raises(LookupError):
        parity.run("taxi", model_repository=repository, metadata=str(repo / "metadata.sqlite"))
    assert picked == [2]


def test_parity_names_the_folder_when_no_version_is_complete(tmp_path):
    from ops import parity

    _push(tmp_path, "taxi", 1, complete=False)
    with pytest.raises(SystemExit, match=r"taxi: no complete version"):
        parity.run("taxi", model_repository=str(tmp_path), metadata=str(tmp_path / "m.sqlite"))


def test_labels_come_from_models_config_only(repo):
    from ops import batch_predict, monitor, release

    # A labels.json or a release log beside the versions is not where labels live.
    (repo / "taxi" / "labels.json").write_text(json.dumps({"stable": 1}))
    (repo / "taxi" / "release_log.jsonl").write_text(json.dumps({"label": "stable", "version": 1}) + "\n")
    assert model_config.repository_labels(str(repo), "taxi") == {}
    assert release.read_labels(str(repo), "taxi") == {}
    assert monitor.served_version(str(repo), "taxi") == 2  # no stable label yet: the latest complete one
    with pytest.raises(batch_predict.BatchPredictError, match=r"models.config: cannot read the model config"):
        batch_predict.resolve_version(str(repo), "taxi", label="stable")

    write_models_config(repo, {"taxi": {"stable": 1, "canary": 2}})
    assert model_config.repository_labels(str(repo), "taxi") == {"stable": 1, "canary": 2}
    assert release.read_labels(str(repo), "taxi") == {"stable": 1, "canary": 2}
    assert monitor.served_version(str(repo), "taxi") == 1
    assert batch_predict.resolve_version(str(repo), "taxi", label="canary") == 2


def test_the_serving_spec_is_read_from_one_place(tmp_path):
    folder = str(_push(tmp_path, "taxi", 1, spec={"classes": ["no", "yes"]}))
    assert model_config.read_serving_spec(folder) == {"classes": ["no", "yes"]}
    assert model_config.read_serving_spec(str(_push(tmp_path, "taxi", 2))) == {}  # exported without one
    broken = _push(tmp_path, "taxi", 3, spec={})
    (broken / "assets.extra" / "serving_spec.json").write_text("[1, 2]")
    with pytest.raises(model_config.ConfigError, match=r"3/assets.extra/serving_spec.json: holds a list"):
        model_config.read_serving_spec(str(broken))
    (broken / "assets.extra" / "serving_spec.json").write_text("{not json")
    with pytest.raises(model_config.ConfigError, match=r"serving_spec.json: not JSON .*re-export the model"):
        model_config.read_serving_spec(str(broken))
    from components import export

    assert export.SERVING_SPEC_FILE == model_config.SERVING_SPEC_FILE  # the trainer writes where servers read


@pytest.mark.parametrize("name", ["", ".", "..", "../taxi", "taxi/1", "a\0b"])
def test_a_model_name_that_is_no_folder_name_never_reaches_outside_the_repository(repo, name):
    with pytest.raises(model_config.ConfigError, match="is not a folder name of the repository"):
        model_config.model_path(str(repo), name)
    assert model_config.model_path(str(repo), "taxi") == str(repo / "taxi")
