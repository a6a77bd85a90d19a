"""Version-skew guard: training and serving must run the same TensorFlow.

Two ways a model trained here can fail in serving although every test of the model passes:
the TF Serving image or the serving environment runs another TensorFlow minor release than
the training lock (or than the training image that trains on Kubeflow), or the exported graph
uses an op that the serving TensorFlow does not register ("Op type not registered ... in
binary running on ..." at load time).

The version parsers read text files only, so the check costs no TensorFlow import; the op
functions import TensorFlow when called.

    python -m serving.versions                 # the four pins agree (major.minor)
    python -m serving.versions ops DIR [DIR]   # SavedModels use only ops this TensorFlow has
"""

import posixpath
import re
import sys
from pathlib import Path
from typing import Dict, Iterable, Set

TRAINING_LOCK = "requirements/lock.txt"
SERVING_REQUIREMENTS = "serving/requirements.txt"
SERVING_DOCKERFILE = "Dockerfile.serve"
TRAINING_DOCKERFILE = "Dockerfile.train"

_PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*==\s*([^\s;#\\]+)")
# A registry host or an --platform flag may precede the image; the tag must be a version.
_SERVING_FROM = re.compile(r"^\s*FROM\s+(?:--\S+\s+)*(?:\S+/)?tensorflow/serving:([^\s@]+)", re.I | re.M)
_VERSION = re.compile(r"^(\d+)\.(\d+)(?:\.\d+)?")
_TFX_FROM = re.compile(r"^\s*FROM\s+(?:--\S+\s+)*(?:\S+/)?tensorflow/tfx:([^\s@]+)", re.I | re.M)
# The TensorFlow minor release each TFX release requires, for an image built on tensorflow/tfx.
TFX_TENSORFLOW = {"1.14": "2.13", "1.15": "2.15", "1.16": "2.16"}
_TF_PIN = re.compile(r"\btensorflow(?:-cpu)?==([0-9][^\s\"';\\]*)")
_REQUIREMENTS_ARG = re.compile(r"(?:^|\s)(?:-r|--requirement)(?:\s+|=)(\S+)")


class VersionSkew(ValueError):
    """Training and serving pin different TensorFlow major.minor releases."""


def major_minor(version: str) -> str:
    match = _VERSION.match(version)
    if not match:
        raise ValueError(f"not a release version: {version!r}")
    return f"{match[1]}.{match[2]}"


def pins(requirements: Path) -> Dict[str, str]:
    """{normalized name: version} of every `name==version` line of a requirements file."""
    found = {}
    for line in Path(requirements).read_text().splitlines():
        match = _PIN.match(line)
        if match:
            found[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    return found


def pinned_tensorflow(requirements: Path) -> str:
    found = pins(requirements)
    version = found.get("tensorflow") or found.get("tensorflow-cpu")
    if version is None:
        raise ValueError(f"{requirements}: no `tensorflow==<version>` pin")
    return version


def serving_image_tensorflow(dockerfile: Path) -> str:
    """The TensorFlow release of the `FROM tensorflow/serving:<tag>` image (the tag is TF's)."""
    tags = set(_SERVING_FROM.findall(Path(dockerfile).read_text()))
    if not tags:
        raise ValueError(f"{dockerfile}: no `FROM tensorflow/serving:<tag>` line")
    if len(tags) > 1:
        raise VersionSkew(f"{dockerfile}: several tensorflow/serving tags {sorted(tags)}")
    tag = tags.pop()
    if not _VERSION.match(tag):
        raise ValueError(f"{dockerfile}: tensorflow/serving:{tag} is not pinned to a release version")
    return tag


def dockerfile_instructions(text: str):
    """(KEYWORD, arguments) of each Dockerfile instruction, continuation lines joined, comments dropped."""
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = (pending + line).strip(), ""
        if line:
            keyword, _, arguments = line.partition(" ")
            yield keyword.upper(), arguments.strip()


def training_image_tensorflow(dockerfile: Path, root: Path = Path(".")) -> str:
    """The TensorFlow release the training image installs.

    Read from a `tensorflow==` pin in a RUN line, from the requirements files RUN installs
    (`-r FILE`, traced back through COPY to the build context, e.g. requirements/lock.txt), or
    from a tensorflow/tfx:<tag> base image. Several different answers are a skew of their own.
    """
    dockerfile, root = Path(dockerfile), Path(root)
    text = dockerfile.read_text()
    found: Dict[str, str] = {}
    copied: Dict[str, str] = {}  # path in the image -> path in the build context
    workdir = "/"
    for keyword, arguments in dockerfile_instructions(text):
        if keyword == "FROM":  # each stage starts at / with nothing copied
            workdir, copied = "/", {}
        elif keyword == "WORKDIR":
            workdir = posixpath.join(workdir, arguments)
        elif keyword in ("COPY", "ADD") and "--from" not in arguments:
            *sources, destination = [w for w in arguments.split() if not w.startswith("--")]
            destination = posixpath.join(workdir, destination)
            for source in sources:
                into_folder = destination.endswith("/") or len(sources) > 1
                copied[posixpath.join(destination, posixpath.basename(source)) if into_folder else destination] = source
        elif keyword == "RUN":
            for version in _TF_PIN.findall(arguments):
                found[f"RUN ... tensorflow=={version}"] = version
            for path in _REQUIREMENTS_ARG.findall(arguments):
                in_image = posixpath.join(workdir, path)
                source = copied.get(in_image) or next(
                    (src.rstrip("/") + in_image[len(dst.rstrip("/")):] for dst, src in copied.items()
                     if src.endswith("/") and in_image.startswith(dst.rstrip("/") + "/")), None)
                if source is None:
                    raise ValueError(f"{dockerfile}: RUN installs {path}, which no COPY brings from the build context")
                found[source] = pinned_tensorflow(root / source)
    for tag in _TFX_FROM.findall(text):
        tfx_release = major_minor(tag) if _VERSION.match(tag) else tag
        if tfx_release not in TFX_TENSORFLOW:
            raise ValueError(f"{dockerfile}: tensorflow/tfx:{tag}: no known TensorFlow release for it")
        found[f"tensorflow/tfx:{tag}"] = TFX_TENSORFLOW[tfx_release]
    if not found:
        raise ValueError(f"{dockerfile}: cannot tell which TensorFlow the image installs (no tensorflow== pin, "
                         f"no -r requirements file, no tensorflow/tfx base image)")
    if len({major_minor(v) for v in found.values()}) > 1:
        raise VersionSkew(f"{dockerfile}: installs several TensorFlow releases: "
                          f"{'; '.join(f'{where} has {v}' for where, v in found.items())}")
    return next(iter(found.values()))


def tensorflow_versions(root: Path = Path(".")) -> Dict[str, str]:
    """{file: TensorFlow version} for the training lock and image and the serving environment and image."""
    root = Path(root)
    return {
        TRAINING_LOCK: pinned_tensorflow(root / TRAINING_LOCK),
        SERVING_REQUIREMENTS: pinned_tensorflow(root / SERVING_REQUIREMENTS),
        SERVING_DOCKERFILE: serving_image_tensorflow(root / SERVING_DOCKERFILE),
        TRAINING_DOCKERFILE: training_image_tensorflow(root / TRAINING_DOCKERFILE, root),
    }


def check_versions_agree(versions: Dict[str, str]) -> None:
    """Raises VersionSkew naming every source whose major.minor differs from the first's."""
    (reference, expected), *others = versions.items()
    wrong = [f"{source} has {v}" for source, v in others if major_minor(v) != major_minor(expected)]
    if wrong:
        raise VersionSkew(f"TensorFlow {major_minor(expected)} expected ({reference} pins {expected}), "
                          f"but {'; '.join(wrong)}")


def graph_ops(saved_model_dir) -> Set[str]:
    """Op types of every node of a SavedModel: top-level graphs and all library functions."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel.FromString((Path(saved_model_dir) / "saved_model.pb").read_bytes())
    ops, functions = set(), set()
    for meta_graph in saved_model.meta_graphs:
        library = meta_graph.graph_def.library
        functions.update(f.signature.name for f in library.function)
        ops.update(node.op for node in meta_graph.graph_def.node)
        for function in library.function:
            ops.update(node.op for node in function.node_def)
    # A node may call a library function by its name as op type: that needs no registration.
    return ops - functions


def unsupported_ops(saved_model_dir, registered_ops: Iterable[str]) -> Set[str]:
    return graph_ops(saved_model_dir) - set(registered_ops)


def registered_op_names() -> Set[str]:
    """Every op registered in this process's TensorFlow.

    That includes ops of any custom-op library imported in the process, so to stand for the
    serving TensorFlow call it in a process that imported TensorFlow only (`main` does).
    """
    try:  # the C API's full list: tf.raw_ops leaves out ops that have no Python wrapper
        from tensorflow.core.framework import op_def_pb2
        from tensorflow.python.client import pywrap_tf_session as c_api
    except ImportError:
        import tensorflow as tf

        return {name for name in dir(tf.raw_ops) if not name.startswith("_")}
    buffer = c_api.TF_GetAllOpList()
    try:
        return {op.name for op in op_def_pb2.OpList.FromString(c_api.TF_GetBuffer(buffer)).op}
    finally:
        c_api.TF_DeleteBuffer(buffer)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["ops"]:
        registered = registered_op_names()
        missing = {d: unsupported_ops(d, registered) for d in args[1:]}
        for saved_model_dir, ops in missing.items():
            print(f"{saved_model_dir}: {', '.join(sorted(ops)) or 'all ops registered'}")
        return 1 if any(missing.values()) else 0
    try:
        versions = tensorflow_versions(Path(args[0]) if args else Path("."))
        check_versions_agree(versions)
    except ValueError as e:  # VersionSkew included
        print(f"version check failed: {e}", file=sys.stderr)
        return 1
    print("; ".join(f"{source}: {v}" for source, v in versions.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
