"""One CSV row reaches the model as the same tensors whichever way it comes: as CsvExampleGen
reads the file for training (its own Beam transform), as a REST :predict request, as a gRPC
Predict request and through batch prediction; and the REST answer is the batch answer's text.

The rows cover what differs between the paths: missing numbers and strings, "nan" (missing),
an int float64 carries exactly but float32 does not (2**53 - 1), quoting and non-ASCII text."""

import json
import math
import os
import shutil
import urllib.request

import numpy as np
import pytest

from tests.conftest import serve, write_sample  # isort: skip  (before apache_beam: see test_batch_predict)
from ops import batch_predict  # isort: skip
from components.values import coerce  # isort: skip

VERSION = 1
ROW_ID = "row_id"  # a column outside the spec: CsvExampleGen keeps it, so its examples can be put in order


@pytest.fixture(scope="module")
def served(small_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("every_path")
    shutil.copytree(small_model[0], root / "taxi" / str(VERSION))
    server = serve(str(root), grpc=True)
    seen = []
    run = server.servables.run

    def spy(loaded, name, inputs):  # what Servables hands the signature, for REST and gRPC alike
        seen.append({k: np.array(v, copy=True) for k, v in inputs.items()})
        return run(loaded, name, inputs)

    server.servables.run = spy
    yield str(root), server, seen
    server.stop()


def _rows(taxi_spec, taxi_rows):
    rows = [{ROW_ID: str(i), **r} for i, r in enumerate(taxi_rows[1500:1506])]
    rows[1].update({n: "" for n, f in taxi_spec.features.items() if not f.required})
    rows[2]["fare"], rows[2]["trip_miles"] = "nan", "NaN"
    rows[3]["trip_start_timestamp"] = str(2 ** 53 - 1)  # float32 cannot hold it: a float32 detour shows
    rows[4]["company"] = 'Caf\u00e9 "\u00ab na\u00efve \u00bb", \u6771\u4eac'
    rows[5]["trip_seconds"], rows[5]["fare"] = "+12", " 7.25 "
    return rows


def _column(name, cells, column_type, dtype):
    values = [coerce(c, column_type) for c in cells]
    if column_type == "string":
        return np.array([v if v is not None else b"" for v in values], dtype=object)
    return np.array([v if v is not None else math.nan for v in values], dtype=dtype)


def _same(a, b, what):
    assert set(a) == set(b), what
    for name in a:
        x, y = np.asarray(a[name]), np.asarray(b[name])
        assert x.dtype == y.dtype and x.shape == y.shape, (what, name, x.dtype, y.dtype, x.shape, y.shape)
        if x.dtype == object:
            assert x.tolist() == y.tolist(), (what, name)
        else:
            assert np.array_equal(x, y, equal_nan=True), (what, name, x, y)  # bit for bit, NaN where missing


def test_a_csv_row_its_rest_and_grpc_requests_and_its_batch_prediction_reach_the_model_alike(
        served, taxi_spec, taxi_rows, tmp_path, monkeypatch):
    import apache_beam as beam
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
    from tfx.components.example_gen.csv_example_gen.executor import _CsvToExample

    import components.export
    from serving import json_tensor

    repository, server, seen = served
    rows = _rows(taxi_spec, taxi_rows)
    header = list(rows[0])
    csv_dir = tmp_path / "csv"
    write_sample(rows, str(csv_dir), "rows.csv")
    contract = batch_predict.load_contract(repository, "taxi", VERSION)
    model = tf.saved_model.load(contract.path)
    specs = model.signatures[batch_predict.SIGNATURE].structured_input_signature[1]
    dtypes = {n: s.dtype.as_numpy_dtype if s.dtype != tf.string else object for n, s in specs.items()}
    columns = {n: _column(n, [r[n] for r in rows], contract.types[n], dtypes[n]) for n in specs}

    # 1. Training's reading of the file: CsvExampleGen's transform, then the signature's parsing.
    out = str(tmp_path / "examples")
    with beam.Pipeline() as p:
        _ = (p | _CsvToExample({"input_base": str(csv_dir)}, "*.csv")
             | beam.Map(lambda e: e.SerializeToString()) | beam.io.WriteToTFRecord(out))
    examples = [r.numpy() for r in tf.data.TFRecordDataset(tf.io.gfile.glob(out + "*"))]
    examples.sort(key=lambda e: int(tf.train.Example.FromString(e).features.feature[ROW_ID].int64_list.value[0]))
    from_csv = {k: v.numpy() for k, v in components.export.raw_inputs(examples, specs).items()}

    # 2. Batch prediction: its record reader and tfx_bsl's cell parser, then RunInference's handler.
    captured = []
    raw_inputs = components.export.raw_inputs
    monkeypatch.setattr(components.export, "raw_inputs",
                        lambda e, s: captured.append(raw_inputs(e, s)) or captured[-1])
    index = {n: header.index(n) for n in contract.types}
    parse = batch_predict._ParseRows(len(header), index, contract.types, contract.required)
    parse.setup()
    batch_examples = []
    for record in batch_predict._ReadRecords().process(os.path.join(str(csv_dir), "rows.csv")):
        (parsed,) = parse.process(record)
        assert isinstance(parsed, tuple), parsed  # not a TaggedOutput of ERRORS
        batch_examples.append(parsed[1])
    assert len(batch_examples) == len(rows)
    handler = batch_predict.ServingSignatureHandler(contract.path)
    results = handler.run_inference(batch_examples, handler.load_model())
    from_batch = {k: v.numpy() for k, v in captured[0].items()}

    # 3. REST :predict, rows as clients send them (serving/json_tensor.py's instances and dumps).
    seen.clear()
    body = json_tensor.dumps({"instances": json_tensor.instances(columns)})
    request = urllib.request.Request(f"{server.url}/v1/models/taxi/versions/{VERSION}:predict", data=body,
                                     method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        rest_answer = json.loads(response.read())["predictions"]
    (from_rest,) = seen

    # 4. gRPC Predict with TensorProtos of the signature's dtypes.
    seen.clear()
    grpc_request = predict_pb2.PredictRequest()
    grpc_request.model_spec.name = "taxi"
    for name, values in columns.items():
        grpc_request.inputs[name].CopyFrom(tf.make_tensor_proto(values, dtype=specs[name].dtype))
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
    grpc_answer = stub.Predict(grpc_request, timeout=60)
    (from_grpc,) = seen

    assert from_csv["fare"].dtype == np.float32 and math.isnan(from_csv["fare"][2])  # "nan" is missing
    assert from_csv["trip_start_timestamp"][3] == 2 ** 53 - 1 and from_csv["company"][4] == rows[4]["company"].encode()
    assert from_csv["fare"][5] == 7.25 and from_csv["trip_seconds"][5] == 12
    _same(from_csv, from_batch, "CsvExampleGen vs batch prediction")
    _same(from_csv, from_rest, "CsvExampleGen vs REST")
    _same(from_csv, from_grpc, "CsvExampleGen vs gRPC")

    # Same tensors in, same answer out: the batch lines are the REST answer, value for value.
    fmt = batch_predict._FormatPrediction()
    batch_answer = [json.loads(next(iter(fmt.process(((i, i + 2), r))))) for i, r in enumerate(results)]
    assert [{k: v for k, v in b.items() if k != "row"} for b in batch_answer] == rest_answer
    grpc_probabilities = tf.make_ndarray(grpc_answer.outputs["probabilities"])
    assert np.array_equal(grpc_probabilities, np.array([r["probabilities"] for r in rest_answer], dtype=np.float32))
