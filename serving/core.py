"""The serving API on loaded models, shared by REST (serving/server.py) and gRPC
(serving/grpc_server.py), so both answer every request alike: inputs and outputs are numpy
arrays here; each front end only translates its wire format.

Rules from tensorflow/serving (file:line in tests/test_serving_conformance.py):
- predict: servables/tensorflow/predict_util.cc (signature lookup, input names, output_filter);
- classify / regress: classifier.cc, regressor.cc (signature checks and result shapes);
- status: model_servers/get_model_status_impl.cc; metadata: get_model_metadata_impl.cc.
"""

import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from tensorflow.python.eager import context as _eager_context
from tensorflow.python.eager.polymorphic_function.concrete_function import ConcreteFunction
from tensorflow.python.framework.ops import EagerTensor

from serving import metrics
from serving.repository import LoadedVersion, NotFound, Repository, UnknownLabel
from serving.wire import CLASSIFY_METHOD, PREDICT_METHOD, REGRESS_METHOD, ServingError, invalid

DEFAULT_SIGNATURE = "serving_default"
SIGNATURE_DEF_FIELD = "signature_def"
# tf.errors.OpError.error_code (absl numbering) -> status code name.
_TF_CODES = {1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND",
             6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION",
             10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED", 13: "INTERNAL", 14: "UNAVAILABLE",
             15: "DATA_LOSS", 16: "UNAUTHENTICATED"}


class ModelSpec:
    def __init__(self, name: str, version: Optional[int] = None, label: Optional[str] = None,
                 signature_name: str = ""):
        self.name, self.version, self.label, self.signature_name = name, version, label, signature_name


class Servables:
    """What both front ends call. `batcher` (serving/batching.py), when given, merges concurrent
    calls of one signature into one model call."""

    def __init__(self, repository: Repository, batcher=None, method_name_check: bool = False):
        self.repository, self.batcher, self.method_name_check = repository, batcher, method_name_check

    # --- lookups -----------------------------------------------------------------------------
    def resolve(self, spec: ModelSpec) -> LoadedVersion:
        if not spec.name:
            raise invalid("Missing model name in request.")
        if spec.version is not None and spec.label is not None:
            raise invalid(f"Both model version ({spec.version}) and model version label ({spec.label}) cannot be "
                          f"supplied.")
        try:
            return self.repository.resolve(spec.name, spec.version, spec.label)
        except NotFound as e:
            raise ServingError("NOT_FOUND", str(e)) from None
        except UnknownLabel as e:
            raise invalid(str(e)) from None

    def input_infos(self, loaded: LoadedVersion, signature_name: str) -> Dict[str, int]:
        """http_rest_api_handler.cc:228-242 GetInfoMap: the signature's inputs and their dtypes."""
        name = signature_name or DEFAULT_SIGNATURE
        infos = loaded.input_infos(name)
        if infos is None:
            raise invalid(f'Serving signature name: "{name}" not found in signature def')
        return infos

    # --- calls -------------------------------------------------------------------------------
    def run(self, loaded: LoadedVersion, signature: str, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """One signature call (through the batcher when batching is on)."""
        if self.batcher is not None:
            return self.batcher.run(loaded, signature, inputs, self._call)
        return self._call(loaded, signature, inputs)

    @staticmethod
    def _call(loaded: LoadedVersion, signature: str, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        fn = loaded.signatures.get(signature)
        if fn is None:
            raise ServingError("FAILED_PRECONDITION", f'Serving signature key "{signature}" cannot be run here')
        specs = loaded.input_dtypes(signature)
        tensors = {}
        for name, value in inputs.items():
            dtype, want, shape = specs[name]
            if value.dtype != want and not (dtype == tf.string and value.dtype.kind in "OSU"):
                raise invalid(f"Expects arg '{name}' to be {dtype.name} but {_dtype_name(value)} is provided")
            if shape is not None and (value.ndim != len(shape) or any(
                    d is not None and d != n for d, n in zip(shape, value.shape))):
                raise invalid(f"input '{name}': shape {list(value.shape)} does not match the signature's "
                              f"{['?' if d is None else d for d in shape]}")
            tensors[name] = _tensor(value, dtype)
        flat = loaded.flat_call(signature)
        started = time.perf_counter()
        try:
            if flat is not None and len(tensors) == len(flat[0]) and set(tensors) == set(flat[0]):
                # ConcreteFunction's own flat call, past the restored function's capture walk
                # (serving/repository.py flat_call says why that is the same call).
                outputs = ConcreteFunction._call_flat(fn, [tensors[k] for k in flat[0]], flat[1])
            else:
                outputs = fn(**tensors)
        except tf.errors.OpError as e:
            raise ServingError(_TF_CODES.get(e.error_code, "UNKNOWN"), _op_error_message(e.message)) from None
        except (ValueError, TypeError) as e:
            raise invalid(str(e).splitlines()[0]) from None
        result = {k: v.numpy() for k, v in outputs.items()}
        metrics.RUNTIME_LATENCY.labels(loaded.model, "Predict", "TF2").observe((time.perf_counter() - started) * 1e6)
        return result

    async def run_async(self, loaded: LoadedVersion, signature: str,
                        inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """run(), awaited on an event loop; batching must be on (the call waits in its batch, no
        thread blocks for it)."""
        return await self.batcher.run_async(loaded, signature, inputs, self._call)

    def predict(self, spec: ModelSpec, inputs: Dict[str, np.ndarray], output_filter: Sequence[str] = (),
                loaded: Optional[LoadedVersion] = None) -> Tuple[LoadedVersion, str, Dict[str, np.ndarray]]:
        """predict_util.cc:82-160 RunPredict / PreProcessPrediction. `loaded`: the version the
        request already resolved (REST resolves it first to read the signature's inputs)."""
        loaded, name, seen = self.check_predict(spec, inputs, output_filter, loaded)
        outputs = self.run(loaded, name, inputs)
        if seen:
            outputs = {k: outputs[k] for k in seen}
        return loaded, name, outputs

    def check_predict(self, spec: ModelSpec, inputs: Dict[str, np.ndarray], output_filter: Sequence[str] = (),
                      loaded: Optional[LoadedVersion] = None) -> Tuple[LoadedVersion, str, List[str]]:
        """predict()'s checks before the model call: (version, signature name, output aliases kept)."""
        loaded = loaded or self.resolve(spec)
        name = spec.signature_name or DEFAULT_SIGNATURE
        signature = loaded.signature_defs.get(name)
        if signature is None:
            raise ServingError("FAILED_PRECONDITION", f'Serving signature key "{name}" not found.')
        if self.method_name_check and signature.method_name not in (PREDICT_METHOD, CLASSIFY_METHOD, REGRESS_METHOD):
            raise ServingError("INTERNAL", f"Expected prediction signature method_name to be one of {{{PREDICT_METHOD}, "
                                           f"{CLASSIFY_METHOD}, {REGRESS_METHOD}}}. Was: {signature.method_name}")
        wanted, given = set(loaded.input_infos(name)), set(inputs)
        if len(given) > len(wanted) or len(given) < len(wanted) or given != wanted:
            extra, missing = sorted(given - wanted), sorted(wanted - given)
            raise invalid(f"input size does not match signature: {len(given)}!={len(wanted)} "
                          f"len({{{','.join(sorted(given))}}}) != len({{{','.join(sorted(wanted))}}}). "
                          f"Sent extra: {{{','.join(extra)}}}. Missing but required: {{{','.join(missing)}}}.")
        seen = []
        for alias in output_filter:
            if alias not in signature.outputs:
                raise invalid(f"output tensor alias not found in signature: {alias} Outputs expected to be in the "
                              f"set {{{','.join(sorted(signature.outputs))}}}.")
            if alias in seen:
                raise invalid(f"duplicate output tensor alias: {alias}")
            seen.append(alias)
        return loaded, name, seen

    def _examples_signature(self, loaded: LoadedVersion, spec: ModelSpec, method: str, kind: str):
        """classifier.cc:151-221 / regressor.cc:146-205: find and check the signature."""
        name = spec.signature_name or DEFAULT_SIGNATURE
        signature = loaded.signature_defs.get(name)
        if signature is None:
            raise invalid(f"No signature was found with the name: {name}")
        if self.method_name_check and signature.method_name != method:
            raise invalid(f"Expected {kind} signature method_name to be {method}. Was: {signature.method_name}")
        if len(signature.inputs) != 1:
            raise invalid("Expected one input Tensor.")
        if kind == "classification" and len(signature.outputs) not in (1, 2):
            raise invalid(f"Expected one or two output Tensors, found {len(signature.outputs)}")
        if kind == "regression" and len(signature.outputs) != 1:
            raise invalid("Expected one output Tensor.")
        if "inputs" not in signature.inputs:
            raise invalid(f"No {kind} inputs found in SignatureDef: {signature}")
        if kind == "classification" and not ({"classes", "scores"} & set(signature.outputs)):
            raise invalid(f'Expected classification signature outputs to contain at least one of "classes" or '
                          f'"scores". Signature was: {signature}')
        if kind == "regression" and "outputs" not in signature.outputs:
            raise invalid(f"No regression outputs found in SignatureDef: {signature}")
        return name

    def classify(self, spec: ModelSpec, examples: List[bytes]) -> Tuple[LoadedVersion, str, List[List[Tuple[str, float]]]]:
        loaded = self.resolve(spec)
        name = self._examples_signature(loaded, spec, CLASSIFY_METHOD, "classification")
        if not examples:
            raise invalid("Input is empty.")
        out = self.run(loaded, name, {"inputs": _strings(examples)})
        classes, scores = out.get("classes"), out.get("scores")
        n = len(examples)
        for label, t, dtype in (("classes", classes, "DT_STRING"), ("scores", scores, "DT_FLOAT")):
            if t is None:
                continue
            if t.ndim != 2:
                raise invalid(f"Expected Tensor shape: [batch_size num_classes] but got {_shape(t)}")
            if (dtype == "DT_STRING") != (t.dtype == object) or (dtype == "DT_FLOAT" and t.dtype != np.float32):
                raise invalid(f"Expected {label} Tensor of {dtype}. Got: {_dtype_name(t)}")
            if t.shape[0] != n:
                raise invalid(f"Expected {label} output batch size of {n}. Got: {t.shape[0]}")
        if classes is not None and scores is not None and classes.shape[1] != scores.shape[1]:
            raise invalid(f"Tensors class and score should match in dim_size(1). Got {classes.shape[1]} vs. "
                          f"{scores.shape[1]}")
        width = (classes if classes is not None else scores).shape[1]
        results = [[((classes[i, c].decode("utf-8", "backslashreplace") if classes is not None else ""),
                     float(scores[i, c]) if scores is not None else 0.0) for c in range(width)] for i in range(n)]
        return loaded, name, results

    def regress(self, spec: ModelSpec, examples: List[bytes]) -> Tuple[LoadedVersion, str, List[float]]:
        loaded = self.resolve(spec)
        name = self._examples_signature(loaded, spec, REGRESS_METHOD, "regression")
        if not examples:
            raise invalid("Input is empty.")
        out = self.run(loaded, name, {"inputs": _strings(examples)})["outputs"]
        n = len(examples)
        if not (out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1)):
            raise invalid(f"Expected output Tensor shape to be either [batch_size] or [batch_size, 1] but got "
                          f"{_shape(out)}")
        if out.shape[0] != n:
            raise invalid(f"Input batch size did not match output batch size: {n} vs. {out.shape[0]}")
        if out.dtype != np.float32:
            raise invalid(f"Expected output Tensor of DT_FLOAT.  Got: {_dtype_name(out)}")
        return loaded, name, [float(v) for v in out.reshape(-1)]

    # --- status and metadata -----------------------------------------------------------------
    def status(self, spec: ModelSpec):
        """get_model_status_impl.cc:66-109: every version the server knows of the model, newest
        first, ended ones included; a label is ignored (only a version narrows the answer)."""
        from tensorflow_serving.apis import get_model_status_pb2

        if not spec.name:
            raise invalid("Missing model name in request.")
        try:
            snapshot = self.repository.snapshot(spec.name)
        except NotFound:
            raise ServingError("NOT_FOUND", f"Could not find any versions of model {spec.name}") from None
        version = spec.version
        states = snapshot.states
        if version is not None:
            if version not in states:
                raise ServingError("NOT_FOUND", f"Could not find version {version} of model {spec.name}")
            chosen = [version]
        else:
            if not states:
                raise ServingError("NOT_FOUND", f"Could not find any versions of model {spec.name}")
            chosen = sorted(states, reverse=True)
        response = get_model_status_pb2.GetModelStatusResponse()
        for v in chosen:
            state = states[v]
            entry = response.model_version_status.add(version=v)
            entry.state = get_model_status_pb2.ModelVersionStatus.State.Value(state.state)
            entry.status.error_code = _error_code(state.error_code)
            entry.status.error_message = state.error_message
        return response

    def metadata(self, spec: ModelSpec, fields: Sequence[str] = (SIGNATURE_DEF_FIELD,)):
        """get_model_metadata_impl.cc: the SignatureDefMap as saved, packed in an Any."""
        from tensorflow_serving.apis import get_model_metadata_pb2

        if not fields:
            raise invalid("GetModelMetadataRequest must specify at least one metadata_field")
        for field in fields:
            if field != SIGNATURE_DEF_FIELD:
                raise invalid(f"Metadata field {field} is not supported")
        loaded = self.resolve(spec)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = loaded.version
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for name, signature in loaded.signature_defs.items():
            signature_map.signature_def[name].CopyFrom(signature)
        response.metadata[SIGNATURE_DEF_FIELD].Pack(signature_map)
        return response


def warm(loaded: LoadedVersion, log) -> None:
    """Runs one PredictionLog record of a warmup file on the version being loaded (the
    Repository's `warmup` hook; unbatched, as TF Serving replays warmup before serving)."""
    kind = log.WhichOneof("log_type")
    if kind == "predict_log":
        request = log.predict_log.request
        name = request.model_spec.signature_name or DEFAULT_SIGNATURE
        Servables._call(loaded, name, {k: tf.make_ndarray(v) for k, v in request.inputs.items()})
    elif kind in ("classify_log", "regress_log"):
        request = getattr(log, kind).request
        name = request.model_spec.signature_name or DEFAULT_SIGNATURE
        Servables._call(loaded, name, {"inputs": _strings(serialized_examples(request.input))})
    else:
        raise ValueError(f"warmup record of kind {kind} is not supported")


def serialized_examples(model_input) -> List[bytes]:
    """tensorflow.serving.Input (example_list or example_list_with_context) as serialized
    examples, the context prepended to each as util.cc:183-200 does."""
    kind = model_input.WhichOneof("kind")
    if kind == "example_list":
        return [e.SerializeToString() for e in model_input.example_list.examples]
    if kind == "example_list_with_context":
        context = model_input.example_list_with_context.context.SerializeToString()
        return [context + e.SerializeToString() for e in model_input.example_list_with_context.examples]
    return []


def _tensor(value: np.ndarray, dtype: tf.DType) -> EagerTensor:
    """The eager tensor tf.constant makes, without its wrappers and its defensive copy: 80-100 us
    of CPU saved on a 17-input row (benchmarks/bench_serving.py). No copy is needed because every
    array reaching a call is made for that request (JSON, TensorProto or a batch's concatenation)
    and nothing writes to it afterwards. No device either (None, where tf.constant passes the
    context's, here ''): the tensor is made in host memory, as a TF Serving session's feeds are,
    and the function call places it; naming the device costs a handle copy, 0.09 ms instead of
    0.48 ms for the 17 inputs of a taxi row here (same tensors on CPU:0, same outputs). Without a
    device the constructor needs the eager context made already (tf.constant makes it itself)."""
    _eager_context.ensure_initialized()
    return EagerTensor(value, None, dtype.as_datatype_enum)


def _op_error_message(message: str) -> str:
    """The message of a failed op as a session reports it, without the eager wrapper's preamble
    ("Graph execution error: Detected at node ... <stack traces unavailable>")."""
    if "<stack traces unavailable>" in message:
        message = message.split("<stack traces unavailable>", 1)[1]
    return message.split("\n\t [[")[0].strip()


def _strings(values: List[bytes]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def _shape(array: np.ndarray) -> str:
    return "[" + ",".join(str(d) for d in array.shape) + "]"


def _dtype_name(array: np.ndarray) -> str:
    kind = array.dtype
    if kind == object or kind.kind in "SU":
        return "DT_STRING"
    return {np.dtype(np.float32): "DT_FLOAT", np.dtype(np.float64): "DT_DOUBLE", np.dtype(np.int64): "DT_INT64",
            np.dtype(np.int32): "DT_INT32", np.dtype(np.bool_): "DT_BOOL"}.get(kind, str(kind))


def _error_code(name: str) -> int:
    from tensorflow_serving.apis import status_pb2

    return status_pb2.StatusProto.DESCRIPTOR.fields_by_name["error_code"].enum_type.values_by_name[name].number
