"""TF Serving messages that tensorflow-serving-api does not ship, built from upstream's .proto
definitions: BatchingParameters (tensorflow_serving/servables/tensorflow/session_bundle_config.proto:
149-203) and MonitoringConfig (tensorflow_serving/config/monitoring_config.proto). The field names,
numbers and types are upstream's, so the text protos the TF Serving image reads
(serving/config/*.config) parse here by the same rules, and a misspelt field fails here too.
"""

import functools


@functools.lru_cache(maxsize=None)
def _pool():
    from google.protobuf import descriptor_pb2, descriptor_pool, wrappers_pb2

    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="skewless/tf_serving_upstream.proto", package="tensorflow.serving", syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"])

    def message(name, fields):
        added = proto.message_type.add(name=name)
        for number, (field, kind, type_name, label) in enumerate(fields, start=1):
            added.field.add(name=field, number=number, type=kind, type_name=type_name, label=label)

    optional, repeated, wrapped = F.LABEL_OPTIONAL, F.LABEL_REPEATED, F.TYPE_MESSAGE
    message("BatchingParameters", [
        ("max_batch_size", wrapped, ".google.protobuf.Int64Value", optional),
        ("batch_timeout_micros", wrapped, ".google.protobuf.Int64Value", optional),
        ("max_enqueued_batches", wrapped, ".google.protobuf.Int64Value", optional),
        ("num_batch_threads", wrapped, ".google.protobuf.Int64Value", optional),
        ("thread_pool_name", wrapped, ".google.protobuf.StringValue", optional),
        ("allowed_batch_sizes", F.TYPE_INT64, None, repeated),
        ("pad_variable_length_inputs", F.TYPE_BOOL, None, optional),
        ("enable_large_batch_splitting", wrapped, ".google.protobuf.BoolValue", optional),
        ("max_execution_batch_size", wrapped, ".google.protobuf.Int64Value", optional)])
    message("PrometheusConfig", [("enable", F.TYPE_BOOL, None, optional),
                                 ("path", F.TYPE_STRING, None, optional)])
    message("MonitoringConfig", [("prometheus_config", wrapped, ".tensorflow.serving.PrometheusConfig", optional)])
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.AddSerializedFile(proto.SerializeToString())
    return pool


def message_class(name: str):
    """BatchingParameters, PrometheusConfig or MonitoringConfig."""
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(_pool().FindMessageTypeByName(f"tensorflow.serving.{name}"))
