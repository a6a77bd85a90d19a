"""configs/spec.schema.json: the committed JSON Schema of a dataset spec is the one SpecConfig generates,
and every spec in configs/ validates against it (what an editor does with the YAML)."""

import copy
import glob
import json

import jsonschema
import pytest
import yaml

from components import feature_spec

SPECS = sorted(p for p in glob.glob(f"{feature_spec.REPO_ROOT}/configs/*.yaml")
               if "features" in (yaml.safe_load(open(p)) or {}))


def _committed():
    with open(feature_spec.SCHEMA_JSON) as f:
        return json.load(f)


def test_the_committed_schema_is_what_the_model_generates():
    assert _committed() == json.loads(json.dumps(feature_spec.json_schema())), "run `make schema-json`"


def test_the_schema_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(_committed())


def test_there_are_specs_to_check():
    assert {"taxi.yaml", "synthetic_multiclass.yaml", "synthetic_regression.yaml"} <= {p.rsplit("/", 1)[1] for p in SPECS}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.rsplit("/", 1)[1])
def test_every_spec_validates_against_the_schema_and_the_model(path):
    with open(path) as f:
        raw = yaml.safe_load(f)
    jsonschema.validate(raw, _committed(), cls=jsonschema.Draft202012Validator)
    assert feature_spec.parse(raw, source=path).name == raw["name"]


@pytest.mark.parametrize("mutate, where", [
    (lambda r: r["features"]["fare"].update(type="double"), ["features", "fare", "type"]),
    (lambda r: r.update(owner="me"), []),
    (lambda r: r["features"]["company"].update(transform="onehot"), ["features", "company", "transform"]),
    (lambda r: r["training"]["schedule"][0].update(epochs=0), ["training", "schedule", 0, "epochs"]),
])
def test_the_schema_refuses_what_the_model_refuses(mutate, where):
    with open(f"{feature_spec.REPO_ROOT}/configs/taxi.yaml") as f:
        raw = yaml.safe_load(f)
    bad = copy.deepcopy(raw)
    mutate(bad)
    with pytest.raises(jsonschema.ValidationError) as info:
        jsonschema.validate(bad, _committed(), cls=jsonschema.Draft202012Validator)
    assert list(info.value.absolute_path)[:len(where)] == where
    with pytest.raises(feature_spec.SpecError):
        feature_spec.parse(bad)
