"""Beam profiles: named sets of Beam arguments in configs/beam/<name>.yaml.

An environment file (configs/local.yaml, configs/kubeflow.yaml) names one with `beam_profile:`;
its own `beam_args:` come after the profile's, so they add to it or override a flag (Beam's
parser keeps the last value). A profile may leave values to the environment:

    runner: DataflowRunner
    vars: {project: null, region: europe-west1}   # null: the environment file must set it
    args:
      - --project={project}
      - --temp_location={pipeline_root}/beam-temp

`{name}` placeholders are filled from the profile's `vars:`, then the environment file's
`beam_vars:`, then what the runner knows (`pipeline_root`, `name`, and `image` on Kubeflow).
Loading reads YAML only; `check_flags` asks Beam's own parser and so imports Beam.
"""

import contextlib
import io
import os
import re
from typing import Annotated, Any, Dict, List, Mapping, Optional

import pydantic

from components import feature_spec
from serving import typed_config

PROFILE_DIR = os.path.join(feature_spec.REPO_ROOT, "configs", "beam")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ProfileError(feature_spec.SpecError):
    """A Beam profile that cannot be read or filled in; the message names the file and the key."""


def profile_names() -> List[str]:
    return sorted(f[:-len(".yaml")] for f in os.listdir(PROFILE_DIR) if f.endswith(".yaml"))


def profile_path(name: str) -> str:
    """configs/beam/<name>.yaml for a bare name; a path ending in .yaml is taken as it is."""
    if name.endswith((".yaml", ".yml")):
        return feature_spec.resolve_path(name)
    return os.path.join(PROFILE_DIR, f"{name}.yaml")


def _flag(text: str) -> str:
    if not text.startswith("--"):
        raise ValueError(f"must be a --flag[=value] string, got {text!r}")
    return text


class BeamProfile(typed_config.StrictConfig):
    """configs/beam/<name>.yaml: a runner, its flags, and the placeholders they use."""
    runner: str = pydantic.Field(min_length=1, description="a Beam runner, e.g. DirectRunner")
    args: List[Annotated[str, pydantic.AfterValidator(_flag)]] = []
    vars: Dict[str, Any] = pydantic.Field({}, description="placeholder defaults; null: the environment must set it")

    @pydantic.field_validator("args")
    @classmethod
    def _no_runner_flag(cls, args: List[str]) -> List[str]:
        if any(a.split("=", 1)[0] == "--runner" for a in args):
            raise typed_config.at("", "--runner belongs in the runner: key")
        return args


def load_profile(name: str) -> Dict:
    """{"runner", "args", "vars", "source"} of a profile, checked by BeamProfile."""
    path = profile_path(name)
    if not os.path.exists(path):
        raise ProfileError(f"beam profile '{name}': no file {path} (profiles: {', '.join(profile_names())})")
    raw, lines, path = feature_spec.read_yaml(path, "beam profile", ProfileError)
    try:
        profile = BeamProfile.model_validate(raw if raw is not None else {})
    except pydantic.ValidationError as e:
        raise ProfileError(typed_config.describe(e, BeamProfile, path, lines)) from None
    return {**profile.model_dump(), "source": path}


def fill(profile: Mapping, variables: Mapping, env_source: str) -> List[str]:
    """The profile's arguments with --runner first and every {placeholder} replaced."""
    values = {**profile["vars"], **variables}
    filled = []
    for arg in [f"--runner={profile['runner']}"] + list(profile["args"]):
        def value(match, arg=arg):
            key = match[1]
            if values.get(key) is None:
                raise ProfileError(f"{profile['source']}: {arg}: no value for '{key}'; set beam_vars.{key} "
                                   f"in {env_source}")
            return str(values[key])
        filled.append(_PLACEHOLDER.sub(value, arg))
    return filled


def beam_args(environment: Mapping, env_source: str, profile: Optional[str] = None, **known) -> List[str]:
    """The Beam arguments an environment file asks for: its profile's, then its own beam_args.

    `profile` (a runner's --beam_profile) replaces the file's `beam_profile:`; `known` are the
    placeholders the runner fills (pipeline_root, name, image).
    """
    # The environment file's own model (pipelines/environment.py) has checked beam_args and beam_vars.
    extra = environment.get("beam_args") or []
    variables = environment.get("beam_vars") or {}
    name = profile or environment.get("beam_profile")
    if not name:
        return list(extra)
    return fill(load_profile(name), {**variables, **known}, env_source) + list(extra)


def for_tfx(args: List[str]) -> List[str]:
    """The arguments to give TFX: none when they only say what Beam does without any (the
    DirectRunner, in memory, one worker: configs/beam/direct_in_memory.yaml), else `args`.

    TFX's Beam components build a source package of TFX for remote workers whenever they are
    given arguments that name no dependency (tfx/dsl/components/base/base_beam_executor.py lines
    82-84 call dependency_utils.make_beam_dependency_flags only for non-empty arguments): 5-6 s
    a Beam component here, four per run, for a package the in-memory runner never installs.
    Passing no arguments gives TFX the same runner, mode and worker count without that build.
    """
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    def options(flags: List[str]) -> Dict[str, Any]:
        values = PipelineOptions(flags).get_all_options(drop_default=False)
        values["runner"] = values.get("runner") or StandardOptions.DEFAULT_RUNNER  # what Beam runs for None
        return values

    return [] if options(args) == options([]) else list(args)


def unknown_flags(args: List[str]) -> List[str]:
    """Flags Beam's PipelineOptions does not know (it would only log and drop them)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    options = PipelineOptions(args)
    return sorted(set(options.get_all_options(retain_unknown_options=True)) - set(options.get_all_options()))


def check_flags(args: List[str], source: str) -> None:
    """Raises ProfileError for a flag Beam does not know or a value its parser refuses."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            unknown = unknown_flags(args)
    except SystemExit:  # argparse refused a value (e.g. a --direct_running_mode that does not exist)
        message = errors.getvalue().strip().splitlines()
        raise ProfileError(f"{source}: Beam refuses the arguments: {message[-1] if message else args}") from None
    if unknown:
        raise ProfileError(f"{source}: Beam does not know {', '.join('--' + f for f in unknown)} "
                           f"(it would drop them silently)")
