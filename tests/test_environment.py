"""pipelines/environment.py: one typed model per environment file; both refuse what they do not know."""

import re

import pytest
import yaml

from components import feature_spec
from pipelines import environment

TAXI = feature_spec.load("configs/taxi.yaml")


def _write(tmp_path, name, base, **changes):
    with open(feature_spec.resolve_path(base)) as f:
        raw = yaml.safe_load(f)
    raw.update(changes)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=True))
    return str(path), path.read_text()


def _line_of(text, key):
    return next(i for i, t in enumerate(text.splitlines(), 1) if t.startswith(f"{key}:"))


def test_the_local_file_loads_with_name_filled_in_and_paths_repo_relative():
    env = environment.load_environment("configs/local.yaml", TAXI)
    assert env["pipeline_root"] == feature_spec.resolve_path("build/pipelines/taxi")
    assert env["metadata_path"] == feature_spec.resolve_path("build/metadata/taxi.sqlite")
    assert env["enable_cache"] is True and env["beam_profile"] == "direct_in_memory"
    assert env["sandbox"]["rows"] == 500 and env["source"] == feature_spec.resolve_path("configs/local.yaml")


@pytest.mark.parametrize("kind, base, loader", [
    ("local", "configs/local.yaml", environment.load_environment),
    ("kubeflow", "configs/kubeflow.yaml", environment.load_kubeflow_environment),
])
def test_both_files_refuse_an_unknown_key_naming_file_line_and_the_allowed_keys(tmp_path, kind, base, loader):
    path, text = _write(tmp_path, f"{kind}.yaml", base, pipeline_rooot="x")
    with pytest.raises(environment.EnvironmentFileError) as info:
        loader(path, TAXI)
    message = str(info.value)
    assert message.startswith(f"{path}: pipeline_rooot: unknown key (allowed: ")
    assert "model_repository" in message and message.endswith(f"({path}:{_line_of(text, 'pipeline_rooot')})")


@pytest.mark.parametrize("changes, message", [
    (dict(enable_cache="yes"), "enable_cache: must be bool, got str ('yes')"),
    (dict(metadata_path=None), "metadata_path: is required"),
    (dict(beam_args="--direct_num_workers=2"), "beam_args: must be list"),
])
def test_local_mistakes_name_the_key(tmp_path, changes, message):
    path, _ = _write(tmp_path, "local.yaml", "configs/local.yaml", **changes)
    with pytest.raises(feature_spec.SpecError, match=re.escape(f"{path}: {message}")):
        environment.load_environment(path, TAXI)


def test_kubeflow_locations_must_be_object_storage(tmp_path):
    path, _ = _write(tmp_path, "kubeflow.yaml", "configs/kubeflow.yaml", data_path="/data/{name}")
    with pytest.raises(environment.EnvironmentFileError, match=re.escape(f"{path}: data_path: '/data/taxi' is not "
                                                                         "in object storage (gs:// or s3://)")):
        environment.load_kubeflow_environment(path, TAXI)


def test_an_unreadable_file_is_named(tmp_path):
    with pytest.raises(environment.EnvironmentFileError, match="cannot read environment file .*nope.yaml"):
        environment.load_environment(str(tmp_path / "nope.yaml"), TAXI)


def test_a_span_pattern_in_the_kubeflow_data_path_is_refused_with_the_fix(tmp_path):
    """The span pattern is the spec's data.path, kept under the data_path folder (kubeflow_runner.spec_for_image):
    {SPAN} here was a KeyError of str.format; now the file, the key, its line and the fix are named."""
    path, text = _write(tmp_path, "kubeflow.yaml", "configs/kubeflow.yaml", data_path="gs://b/data/{name}/span-{SPAN}/")
    with pytest.raises(environment.EnvironmentFileError) as info:
        environment.load_kubeflow_environment(path, TAXI)
    assert str(info.value).startswith(f"{path}: data_path: 'gs://b/data/{{name}}/span-{{SPAN}}/' holds {{SPAN}}, "
                                      "but the span pattern is the spec's data.path")
    assert "give the folder that holds the span folders" in str(info.value)
    assert str(info.value).endswith(f"({path}:{_line_of(text, 'data_path')})")


@pytest.mark.parametrize("location, what", [("gs://b/{user}/root", "'{user}'"),
                                            ("gs://b/{name/root", "braces other than {name}")])
def test_a_placeholder_other_than_name_is_named_with_its_key_and_line(tmp_path, location, what):
    path, text = _write(tmp_path, "local.yaml", "configs/local.yaml", pipeline_root=location)
    with pytest.raises(environment.EnvironmentFileError,
                       match=re.escape(f"{path}: pipeline_root: '{location}' has {what}") + r".*only \{name\}.*"
                             + re.escape(f"({path}:{_line_of(text, 'pipeline_root')})")):
        environment.load_environment(path, TAXI)
