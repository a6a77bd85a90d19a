"""TF Serving's gRPC API (port 8500) on grpcio, with tensorflow-serving-api's generated stubs:
PredictionService (Predict, Classify, Regress, GetModelMetadata) and ModelService
(GetModelStatus, HandleReloadConfigRequest). The same core as REST (serving/core.py) answers,
so both give identical results; only the wire differs (TensorProto instead of JSON).
Specification: model_servers/prediction_service_impl.cc and model_service_impl.cc.
"""

import logging
import math
import time
from concurrent import futures
from typing import Tuple

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (classification_pb2, model_management_pb2, model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc, regression_pb2)

from serving import metrics
from serving.core import ModelSpec, Servables, serialized_examples
from serving.wire import ServingError

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


# DataType -> (the TensorProto field a list of values is written to, numpy dtype).
_LISTED = {tf.float32.as_datatype_enum: ("float_val", np.float32), tf.float64.as_datatype_enum: ("double_val", np.float64),
           tf.int64.as_datatype_enum: ("int64_val", np.int64), tf.int32.as_datatype_enum: ("int_val", np.int32),
           tf.bool.as_datatype_enum: ("bool_val", np.bool_), tf.string.as_datatype_enum: ("string_val", object)}


def _ndarray(proto) -> np.ndarray:
    """tf.make_ndarray, quicker for the usual request: one listed value per element (what
    tf.make_tensor_proto writes for a list, and what TF Serving clients send) of a common dtype.
    For the 17 inputs of a taxi row make_ndarray took 0.25 ms of CPU here, this path 0.07 ms.
    Everything else (tensor_content, a value repeated to fill the shape, other dtypes) is
    make_ndarray's."""
    listed = _LISTED.get(proto.dtype)
    if listed is not None and not proto.tensor_content and not proto.tensor_shape.unknown_rank:
        dims = proto.tensor_shape.dim
        values = getattr(proto, listed[0])
        count = len(values)
        if len(dims) == 1 and dims[0].size == count:  # a column, the usual input: no shape to compute
            shape = None
        else:
            shape = [d.size for d in dims]
            if count != math.prod(shape) or min(shape, default=0) < 0:
                return tf.make_ndarray(proto)
        if listed[1] is object:
            array = np.empty(count, dtype=object)
            array[:] = list(values)
        else:
            array = np.fromiter(values, dtype=listed[1], count=count)
        return array if shape is None else array.reshape(shape)
    return tf.make_ndarray(proto)


# numpy dtype of an output -> (DataType, the TensorProto field its values are listed in): _LISTED turned round.
_OUTPUT_FIELDS = {np.dtype(np_type): (enum, field) for enum, (field, np_type) in _LISTED.items()}


def _write_tensor(array: np.ndarray, proto) -> None:
    """Writes `array` into the empty TensorProto `proto` as TF Serving writes a Predict output:
    Tensor::AsProtoField, every value listed in the dtype's typed field and never packed into
    tensor_content (predict_util.cc PostProcessPredictionResult, kAsProtoField, the option
    RunPredict passes). tf.make_tensor_proto would pack more than one number into tensor_content:
    tf.make_ndarray reads both alike, but a client reading `float_val` (as many do) would find it
    empty here and full on TF Serving. Other dtypes, and strings that are not bytes, are left to
    tf.make_tensor_proto (the taxi and synthetic models return none of them)."""
    known = _OUTPUT_FIELDS.get(array.dtype)
    values = array.ravel().tolist() if known is not None else None
    if known is None or (array.dtype == object and not all(type(v) is bytes for v in values)):
        proto.CopyFrom(tf.make_tensor_proto(array))
        return
    proto.dtype = known[0]
    proto.tensor_shape.SetInParent()
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    getattr(proto, known[1]).extend(values)


def _spec(model_spec) -> ModelSpec:
    choice = model_spec.WhichOneof("version_choice")
    return ModelSpec(model_spec.name, model_spec.version.value if choice == "version" else None,
                     model_spec.version_label if choice == "version_label" else None, model_spec.signature_name)


def _fill_spec(out, name: str, version: int, signature: str) -> None:
    out.name, out.signature_name = name, signature
    out.version.value = version


class _Calls:
    """Error handling and metrics shared by every method."""

    def __init__(self, servables: Servables):
        self.servables = servables

    def call(self, context, api: str, model: str, fn):
        started = time.perf_counter()
        status = "OK"
        try:
            return fn()
        except ServingError as e:
            status = e.code
            context.abort(getattr(grpc.StatusCode, e.code, grpc.StatusCode.UNKNOWN), e.message)
        except Exception as e:  # a bug here answers INTERNAL and the server keeps serving
            if isinstance(e, grpc.RpcError) or type(e).__name__ == "_AbortError":
                raise
            logging.exception("internal error in gRPC %s", api)
            status = "INTERNAL"
            context.abort(grpc.StatusCode.INTERNAL, f"Internal error: {type(e).__name__}")
        finally:
            if model:
                metrics.record_request(model, self.servables.repository.knows(model), api, "GRPC", status, started)


class PredictionService(_Calls, prediction_service_pb2_grpc.PredictionServiceServicer):
    def Predict(self, request, context):
        def run():
            spec = _spec(request.model_spec)
            inputs = {}
            for name, proto in request.inputs.items():
                try:
                    inputs[name] = _ndarray(proto)
                except (TypeError, ValueError) as e:
                    raise ServingError("INVALID_ARGUMENT", f"input '{name}': not a valid TensorProto: {e}") from None
            loaded, signature, outputs = self.servables.predict(spec, inputs, list(request.output_filter))
            response = predict_pb2.PredictResponse()
            _fill_spec(response.model_spec, spec.name, loaded.version, signature)
            for name, value in outputs.items():
                _write_tensor(value, response.outputs[name])
            return response
        return self.call(context, "predict", request.model_spec.name, run)

    def Classify(self, request, context):
        def run():
            spec = _spec(request.model_spec)
            loaded, signature, results = self.servables.classify(spec, serialized_examples(request.input))
            response = classification_pb2.ClassificationResponse()
            _fill_spec(response.model_spec, spec.name, loaded.version, signature)
            for row in results:
                classifications = response.result.classifications.add()
                for label, score in row:
                    classifications.classes.add(label=label, score=score)
            return response
        return self.call(context, "classify", request.model_spec.name, run)

    def Regress(self, request, context):
        def run():
            spec = _spec(request.model_spec)
            loaded, signature, values = self.servables.regress(spec, serialized_examples(request.input))
            response = regression_pb2.RegressionResponse()
            _fill_spec(response.model_spec, spec.name, loaded.version, signature)
            for value in values:
                response.result.regressions.add(value=value)
            return response
        return self.call(context, "regress", request.model_spec.name, run)

    def GetModelMetadata(self, request, context):
        return self.call(context, "metadata", request.model_spec.name,
                         lambda: self.servables.metadata(_spec(request.model_spec), list(request.metadata_field)))

    def MultiInference(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "MultiInference is not supported by the local server")


class ModelService(_Calls, model_service_pb2_grpc.ModelServiceServicer):
    def GetModelStatus(self, request, context):
        return self.call(context, "status", request.model_spec.name,
                         lambda: self.servables.status(_spec(request.model_spec)))

    def HandleReloadConfigRequest(self, request, context):
        """model_service_impl.cc: take the new ModelServerConfig; the answer carries the status."""
        from serving import model_config

        response = model_management_pb2.ReloadConfigResponse()
        try:
            self.servables.repository.reload_config(request.config)
            response.status.error_code = 0
        except model_config.ConfigError as e:
            response.status.error_code = 3  # INVALID_ARGUMENT
            response.status.error_message = str(e)
        return response


def make_grpc_server(servables: Servables, host: str, port: int, threads: int) -> Tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc"),
                         options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                  ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
                         maximum_concurrent_rpcs=1024)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(servables), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(servables), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"cannot listen for gRPC on {host}:{port}")
    return server, bound
