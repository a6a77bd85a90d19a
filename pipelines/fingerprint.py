"""Is this run the last one again? An unchanged `make run` is answered without starting TFX.

TFX's cache (ML Metadata) would find every component CACHED too, but only after importing TFX
and TensorFlow (about 20 s here) and walking the DAG. The fingerprint below covers what a run
reads, so equal fingerprints mean TFX would reuse every output:
- the spec file and the environment file as bytes, the Beam profile asked for, the profiles' files;
- the curated schema file, when the spec names one;
- each CSV the run reads (spec.csv_files(): the file, the folder's files or the rolling window of
  spans) by path, size and modification time — what TFX's ExampleGen fingerprints (name, bytes,
  mtime), at nanosecond resolution instead of its seconds;
- the code a run executes (components/, pipelines/, serving/ sources), the pinned lock and the
  Python version.
A reused run must also still have its outputs: the artifacts and reports its summary names, the
pushed version's folder. Anything missing or changed means a real run. `--force` skips the check.
code_commit() names the same code by its git commit, the tag runners give a run for lineage.
"""

import glob
import hashlib
import json
import os
import subprocess
import sys
from typing import Any, Dict, Optional, Sequence, Tuple

from components.feature_spec import REPO_ROOT, FeatureSpec

CODE_ROOMS = ("components", "pipelines", "serving")
KEY = "inputs_fingerprint"


def inputs_fingerprint(spec: FeatureSpec, spec_path: str, env_path: str, beam_profile: Optional[str] = None) -> str:
    digest = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        digest.update(label.encode() + b"\0" + hashlib.sha256(data).digest())

    def add_file(path: str) -> None:
        with open(path, "rb") as f:
            add(os.path.relpath(path, REPO_ROOT), f.read())

    add_file(spec_path)
    add_file(env_path)
    add("beam_profile", (beam_profile or "").encode())
    for path in sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "beam", "*.yaml"))):
        add_file(path)
    if spec.schema_path:
        add_file(spec.schema_path)
    for path in spec.csv_files():
        stat = os.stat(path)
        add("data", f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    for room in CODE_ROOMS:
        for path in sorted(glob.glob(os.path.join(REPO_ROOT, room, "**", "*.py"), recursive=True)):
            add_file(path)
    add_file(os.path.join(REPO_ROOT, "requirements", "lock.txt"))
    add("python", sys.version.encode())
    return digest.hexdigest()


def code_commit() -> Optional[str]:
    """The git commit of the code a run executes (REPO_ROOT's HEAD), "+uncommitted" appended when a
    tracked file differs from it; None outside a git checkout or without git. Runners tag their run in
    ML Metadata with it (mlmd.CODE_COMMIT), for the release's lineage."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not commit:
        return None
    return commit + ("+uncommitted" if dirty else "")


def unchanged_run(summary_path: str, fingerprint: str,
                  also_needed: Sequence[str] = ()) -> Tuple[Optional[Dict[str, Any]], str]:
    """(the previous summary, "") when it stands for this run; else (None, why a run is needed).

    also_needed: paths the run's outputs live in beyond its summary (the metadata store)."""
    try:
        with open(summary_path) as f:
            previous = json.load(f)
    except (OSError, ValueError):
        return None, f"no previous summary at {summary_path}"
    if previous.get(KEY) != fingerprint:
        return None, "the spec, environment, data or code changed since the previous run"
    if not previous.get("succeeded"):
        return None, "the previous run failed"
    outputs = list(also_needed)
    outputs += [uri for uri in (previous.get("artifacts") or {}).values() if uri]
    outputs += list((previous.get("reports") or {}).values())
    if previous.get("pushed"):
        outputs.append(previous.get("model_path") or "")
    missing = [path for path in outputs if not os.path.exists(path)]
    if missing:
        return None, f"an output of the previous run is gone: {missing[0]}"
    return previous, ""
