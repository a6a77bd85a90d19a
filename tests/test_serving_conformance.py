"""The local server against TF Serving's own sources: each case cites the file and lines of
tensorflow/serving (commit 9d981c5, 2026-07-30) it is taken from. Abbreviations:
  U  tensorflow_serving/model_servers/http_rest_api_util.cc     H  .../http_rest_api_handler.cc
  HS tensorflow_serving/model_servers/http_server.cc            HT .../http_rest_api_handler_test.cc
  J  tensorflow_serving/util/json_tensor.cc                      JT .../json_tensor_test.cc
  PU tensorflow_serving/servables/tensorflow/predict_util.cc     C  .../classifier.cc
  GS tensorflow_serving/model_servers/get_model_status_impl.cc   SC .../server_core.cc
Where we are deliberately stricter than TF Serving the case says "STRICTER" and why.
"""

import base64
import gzip
import json
import math
import shutil
import socket

import numpy as np
import pytest

from tests.conftest import serve

FEATURES_CASH = {"payment_type": "Cash", "fare": 7.25, "trip_miles": 1.1, "trip_start_hour": 14.0}


@pytest.fixture(scope="module")
def server(small_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("conformance_repo")
    shutil.copytree(small_model[0], root / "taxi" / "1")
    s = serve(root, {"taxi": {"stable": 1}}, grpc=True)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def inputs(server):
    """serving_default's input names and dtypes, from the model itself."""
    fn = server.servables.repository.resolve("taxi").signatures["serving_default"]
    return {k: s.dtype for k, s in fn.structured_input_signature[1].items()}


def full_row(inputs, **values):
    """The one wire form: every named input, NaN for a missing number, "" for a missing string."""
    row = {name: ("" if dtype.name == "string" else math.nan) for name, dtype in inputs.items()}
    row.update(values)
    return row


def raw_http(server, data: bytes, timeout=10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if _complete(b"".join(chunks)):
                    break
        except socket.timeout:
            pass
    return b"".join(chunks)


def _complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return True


def request(server, method, path, body=None, raw=None, headers=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\nConnection: close\r\n"
    for k, v in (headers or {}).items():
        head += f"{k}: {v}\r\n"
    answer = raw_http(server, head.encode("latin-1") + b"\r\n" + data)
    status_line, _, rest = answer.partition(b"\r\n")
    code = int(status_line.split()[1])
    payload = rest.partition(b"\r\n\r\n")[2]
    return code, _strict_json(payload) if payload else None


def _strict_json(payload: bytes):
    """Answers must be standard JSON: NaN / Infinity tokens are refused here."""
    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token} in an answer")
    return json.loads(payload, parse_constant=refuse)


# --- URL grammar (U:31-34, U:90-131, H:65-109, HS:139-150) ----------------------------------

URL_CASES = [
    # (method, path, status, error text, reference)
    ("GET", "/v1/models/taxi", 200, None, "U:33-34 status regex"),
    ("GET", "/V1/MODELS/taxi", 200, None, "U:31-34 (?i): the literal parts ignore case"),
    ("GET", "/v1/models/t%61xi", 200, None, "U:109-114 the model name is URL-decoded (curl_easy_unescape)"),
    ("GET", "/v1/models/taxi/METADATA", 200, "model_version_status", "H:98-103 subresource compared as written"),
    ("POST", "/v1/models/taxi:PREDICT", 400, "Malformed request: POST /v1/models/taxi:PREDICT", "H:74-75,85-96"),
    ("GET", "/v1/models/taxi:predict", 400, "Malformed request: GET /v1/models/taxi:predict", "HT:207-210"),
    ("POST", "/v1/models/taxi", 400, "Malformed request: POST /v1/models/taxi", "HT:202-205"),
    ("POST", "/v1/models/taxi/metadata", 400, "Malformed request: POST", "HT:236-239"),
    ("POST", "/v1/models/taxi:predict?x=1", 400, "Malformed request", "evhttp_request.cc:105-116 query is matched"),
    ("POST", "/v1/models/taxi/versions/HELLO:predict", 400, "Malformed request", "HT:179-257"),
    ("POST", "/v1/models/taxi/version/1:predict", 400, "Malformed request", "HT:179-257"),
    ("POST", "/v1/models/taxi/versions/1/labels/x:predict", 400, "Malformed request", "HT:179-257"),
    ("GET", "/v1/models/taxi/", 400, "Malformed request", "U:33 FullMatch: no trailing slash"),
    ("PUT", "/v1/models/taxi", 400, "Malformed request: PUT /v1/models/taxi", "H:85-105 POST and GET only"),
    ("DELETE", "/v1/models/taxi:predict", 400, "Malformed request: DELETE", "H:85-105"),
    ("GET", "/v1/models", 400, "Missing model name in request.", "H:187-189, HT:193-196"),
    ("GET", "/v1/models/versions/3", 400, "Missing model name in request.", "U:33 group 1 backtracks to empty"),
    ("GET", "/v1/models/nope", 404, "Could not find any versions of model nope", "GS:95-101"),
    ("GET", "/v1/models/taxi/versions/9", 404, "Could not find version 9 of model taxi", "GS:82-93"),
    ("POST", "/v1/models/nope:predict", 404, "Servable not found for request: Latest(nope)", "basic_manager.cc:137-141"),
    ("POST", "/v1/models/taxi/versions/9:predict", 404, "Servable not found for request: Specific(taxi, 9)",
     "basic_manager.cc:137-141"),
    ("POST", "/v1/models/taxi/labels/gold:predict", 400, "Unrecognized servable version label: gold",
     "SC:873-892, HT:310-319: INVALID_ARGUMENT, not NOT_FOUND"),
    ("POST", "/v1/models/taxi/versions/99999999999999999999:predict", 400, "Failed to convert version",
     "U:115-122, HT:228-234 (STRICTER: TF Serving sends this 400 with an empty body; ours is JSON)"),
    ("GET", "/nope", 404, None, "HS:139-150 only (?i)/v1/.* reaches the API (STRICTER: JSON body, not HTML)"),
]


@pytest.mark.parametrize("method,path,code,needle,ref", URL_CASES, ids=[f"{c[0]} {c[1]}" for c in URL_CASES])
def test_url_grammar(server, inputs, method, path, code, needle, ref):
    body = {"instances": [full_row(inputs, **FEATURES_CASH)]} if method in ("POST", "PUT", "DELETE") else None
    got, answer = request(server, method, path, body)
    assert got == code, (ref, answer)
    if needle is not None:
        text = answer.get("error") or json.dumps(answer)
        assert needle in text, (ref, answer)


# --- status, labels, metadata (GS, SC, get_model_metadata_impl.cc, U:133-201) ---------------

def test_status_json_and_labels_are_ignored_by_status(server):
    want = {"model_version_status": [{"version": "1", "state": "AVAILABLE",
                                      "status": {"error_code": "OK", "error_message": ""}}]}
    assert request(server, "GET", "/v1/models/taxi") == (200, want)  # HT:448-513, api_rest.md:452-464
    # GS:82: only a version narrows the answer; a label, known or not, is ignored (GS:95-101).
    assert request(server, "GET", "/v1/models/taxi/labels/stable") == (200, want)
    assert request(server, "GET", "/v1/models/taxi/labels/unknown") == (200, want)


def test_metadata_is_the_saved_signature_defs_as_protobuf_json(server):
    code, meta = request(server, "GET", "/v1/models/taxi/metadata")
    assert code == 200
    # U:147-201: model_spec with proto field names; the SignatureDefMap nested under metadata.
    assert meta["model_spec"] == {"name": "taxi", "signature_name": "", "version": "1"}
    defs = meta["metadata"]["signature_def"]["signature_def"]
    # get_model_metadata_impl.cc:55-59 copies every entry, TF2's init op included.
    assert {"serving_default", "classification", "__saved_model_init_op"} <= set(defs)
    fare = defs["serving_default"]["inputs"]["fare"]
    assert fare["dtype"] == "DT_FLOAT" and fare["name"] == "serving_default_fare:0"
    assert fare["tensor_shape"] == {"dim": [{"size": "-1", "name": ""}], "unknown_rank": False}
    assert defs["classification"]["method_name"] == "tensorflow/serving/classify"
    assert defs["classification"]["inputs"]["inputs"]["dtype"] == "DT_STRING"


# --- predict requests (J:473-705, PU:51-74) --------------------------------------------------

def test_row_and_columnar_requests_give_the_same_answer(server, inputs):
    rows = [full_row(inputs, **FEATURES_CASH), full_row(inputs, payment_type="Credit Card", fare=30.0)]
    code, by_rows = request(server, "POST", "/v1/models/taxi:predict", {"instances": rows})
    assert code == 200 and len(by_rows["predictions"]) == 2
    columns = {name: [r[name] for r in rows] for name in inputs}
    code, by_columns = request(server, "POST", "/v1/models/taxi:predict", {"inputs": columns})
    assert code == 200
    # J:1006-1066: rows are objects per instance, columns one list per output.
    assert [p["probabilities"] for p in by_rows["predictions"]] == by_columns["outputs"]["probabilities"]
    assert [p["classes"] for p in by_rows["predictions"]] == by_columns["outputs"]["classes"]


def test_nan_and_infinity_are_accepted_in_request_json(server, inputs):
    """J:483-485 parses with kParseNanAndInfFlag: NaN is the wire form of a missing number."""
    row = json.dumps({"instances": [full_row(inputs, **FEATURES_CASH)]}).replace('"trip_miles": 1.1',
                                                                                  '"trip_miles": Infinity')
    assert "NaN" in row and "Infinity" in row
    code, answer = request(server, "POST", "/v1/models/taxi:predict", raw=row.encode())
    assert code == 200 and 0 <= answer["predictions"][0]["score"] <= 1


PREDICT_ERRORS = [
    # (body or raw bytes, error text, reference)
    (lambda i: {"instances": [{k: v for k, v in full_row(i, **FEATURES_CASH).items() if k != "fare"}]},
     "keys must be equal to:", "J:583-589 every instance carries every named input"),
    (lambda i: {"instances": [dict(full_row(i, **FEATURES_CASH), tip_jar=3.0)]},
     "does not have named input: tip_jar", "J:446-450 an unknown key"),
    (lambda i: {"instances": [full_row(i, **dict(FEATURES_CASH, fare="cheap"))]},
     'JSON Value: "cheap" Type: String is not of expected type: float', "J:261-266, HT:303-308"),
    (lambda i: {"instances": [full_row(i, **dict(FEATURES_CASH, payment_type=3))]},
     "Type: Number is not of expected type: string", "J:313-316"),
    (lambda i: {"instances": [full_row(i, **dict(FEATURES_CASH, fare=True))]},
     "Type: True is not of expected type: float", "J:293-296 bool is not a number"),
    (lambda i: {"instances": [full_row(i, **FEATURES_CASH)], "inputs": {}},
     "expecting only one of 'inputs' or 'instances' keys to exist", "J:677-681"),
    (lambda i: {"instances": []}, "No values in 'instances' array", "J:687-690"),
    (lambda i: {"instances": {}}, "Expecting 'instances' to be an list/array", "J:683-686"),
    (lambda i: {"signature_name": 7, "instances": [1]}, "'signature_name' key must be a string value.", "J:503-516"),
    (lambda i: {"signature_name": "nope", "instances": [1]},
     'Serving signature name: "nope" not found in signature def', "H:228-242"),
    (lambda i: {"nothing": 1}, "Missing 'inputs' or 'instances' key", "J:704"),
    (lambda i: {"inputs": {k: [v] for k, v in full_row(i, **FEATURES_CASH).items() if k != "fare"}},
     "Missing named input: fare in 'inputs' object.", "J:633-637"),
    (lambda i: {"instances": [1.0, 2.0]}, "instances is a plain list, but expecting list of objects", "J:540-546"),
    (lambda i: {"instances": [full_row(i, **dict(FEATURES_CASH, fare=[7.25]))]}, "input 'fare': shape [1, 1]",
     "PU:109-111 the runtime refuses a shape its signature does not take (a [-1] input fed [1, 1])"),
    (lambda i: {"instances": [full_row(i, **FEATURES_CASH), [1.0]]}, "Expecting object but got list at item 1",
     "J:552-555"),
    (b"", "JSON Parse error: The document is empty", "J:473-476"),
    (b"[1, 2]", "Is not object", "J:497-500"),
    (b"{\"instances\": [", "JSON Parse error", "J:486-490"),
    (b'{"instances": [1e400]}', "JSON Parse error: Number too big to be stored in double.",
     "rapidjson reader.h kParseErrorNumberTooBig"),
    (b'{"instances": ["\\ud800"]}', "The surrogate pair in string is invalid.",
     "rapidjson reader.h kParseErrorStringUnicodeSurrogateInvalid"),
    (b'{"instances": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nesting too deep",
     "STRICTER: rapidjson's iterative parser takes any depth; Python's stops near 1,000"),
    (b"\xff\xfe{}", "Invalid encoding", "STRICTER: rapidjson passes bytes that are not UTF-8 through"),
]


@pytest.mark.parametrize("body,needle,ref", PREDICT_ERRORS, ids=[c[2] for c in PREDICT_ERRORS])
def test_predict_errors_are_400_with_tf_servings_message(server, inputs, body, needle, ref):
    raw = body if isinstance(body, bytes) else json.dumps(body(inputs)).encode()
    code, answer = request(server, "POST", "/v1/models/taxi:predict", raw=raw)
    assert code == 400 and needle in answer["error"], (ref, answer)


# --- b64 in requests (J:356-389, J:395-410, J:519-533, J:609-620) -----------------------------

def _b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


def test_a_b64_object_is_a_string_value_in_row_and_columnar_requests(server, inputs):
    """J:405-408: an object where a DT_STRING value goes is decoded as {"b64": ...} (J:356-389)."""
    plain = full_row(inputs, **FEATURES_CASH)
    encoded = dict(plain, payment_type=_b64(b"Cash"), company=_b64("Taxi Affiliation Services".encode()))
    _, want = request(server, "POST", "/v1/models/taxi:predict",
                      {"instances": [dict(plain, company="Taxi Affiliation Services")]})
    code, by_rows = request(server, "POST", "/v1/models/taxi:predict", {"instances": [encoded]})
    assert code == 200 and by_rows == want
    code, by_columns = request(server, "POST", "/v1/models/taxi:predict",
                               {"inputs": {name: [value] for name, value in encoded.items()}})
    assert code == 200 and by_columns["outputs"]["probabilities"] == [want["predictions"][0]["probabilities"]]


B64_ERRORS = [
    # (the value sent for one input, error text, reference)
    ("payment_type", {"b64": "not base64!"}, "Unable to base64 decode", "J:383-387 absl::Base64Unescape fails"),
    ("payment_type", {"b64": "Q2FzaA==", "x": 1}, "not formatted correctly for base64 data",
     "J:356-371 exactly one key 'b64', then J:268-272 Base64FormatError"),
    ("payment_type", {"b64": 3}, "not formatted correctly for base64 data", "J:366-368 the 'b64' value must be a string"),
    ("fare", {"b64": "MS41"}, "Type: Object is not of expected type: float",
     "J:405-408 b64 is for DT_STRING only: any other dtype gets TypeError (J:264-268)"),
]


@pytest.mark.parametrize("name,value,needle,ref", B64_ERRORS, ids=[c[3] for c in B64_ERRORS])
def test_b64_that_tf_serving_refuses_is_refused_with_its_text(server, inputs, name, value, needle, ref):
    for body in ({"instances": [full_row(inputs, **dict(FEATURES_CASH, **{name: value}))]},
                 {"inputs": {k: [v] for k, v in full_row(inputs, **dict(FEATURES_CASH, **{name: value})).items()}}):
        code, answer = request(server, "POST", "/v1/models/taxi:predict", body)
        assert code == 400 and needle in answer["error"], (ref, answer)


def test_a_single_input_signature_takes_bare_values_and_b64_examples(server, inputs, taxi_spec):
    """J:519-533: with one named input, instances may be bare values (a b64 object is a value, not
    an object: J:532-533); keyed objects work too. J:615-620: so may 'inputs'. J:526-530: with
    several inputs a bare value is refused. serving_tf_example takes serialized tf.Examples."""
    import tensorflow as tf

    values = dict(FEATURES_CASH, company="Flash Cab")
    feature = {}
    for name, value in values.items():
        kind = taxi_spec.features[name].type
        if kind == "string":
            feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode()]))
        elif kind == "float":
            feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=[value]))
        else:
            feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))
    example = _b64(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    _, want = request(server, "POST", "/v1/models/taxi:predict", {"instances": [full_row(inputs, **values)]})
    for body in ({"signature_name": "serving_tf_example", "instances": [example, example]},
                 {"signature_name": "serving_tf_example", "instances": [{"examples": example}] * 2}):
        code, answer = request(server, "POST", "/v1/models/taxi:predict", body)
        assert code == 200 and len(answer["predictions"]) == 2, answer
        np.testing.assert_allclose(answer["predictions"][0]["probabilities"], want["predictions"][0]["probabilities"],
                                   atol=1e-6)
    code, answer = request(server, "POST", "/v1/models/taxi:predict",
                           {"signature_name": "serving_tf_example", "inputs": [example]})
    assert code == 200 and len(answer["outputs"]["probabilities"]) == 1
    code, answer = request(server, "POST", "/v1/models/taxi:predict", {"instances": [_b64(b"Cash")]})
    assert code == 400 and "instances is a plain list, but expecting list of objects" in answer["error"]


# --- outputs JSON cannot carry (J:148-170, J:888-898, J:1086-1090, J:1116-1120) ---------------

def test_a_nan_or_infinite_output_is_a_400_naming_it_where_tf_serving_writes_a_bare_token(tmp_path):
    """TF Serving answers 200 with the non-standard tokens NaN / Infinity / -Infinity (J:162-167
    WriteDecimal writes them as raw number values; J:888-898 for predict, J:1086-1090 classify
    scores, J:1116-1120 regress values), status OK.
    STRICTER, on purpose: our answers are always valid JSON (issue 9, point 7), and most JSON
    parsers (Python's strict mode, JavaScript's JSON.parse, Go's encoding/json) refuse those
    tokens, so a client would fail on a 200. The answer is 400 INVALID_ARGUMENT, not a 5xx: the
    output is a pure function of the request (here a finite input too large for the model's
    float32 arithmetic), the same request fails every time, so it must not be retried as a
    5xx is, nor page the operator as a server fault; client input never yields a 5xx. The error
    names the output and the row, so the client can find the input at fault."""
    from tests.test_server import tiny_model

    tiny_model(tmp_path / "m" / "1", 3.0)  # y = 3 * x in float32
    s = serve(tmp_path)
    try:
        for x, shown in (("3e38", "inf"), ("NaN", "nan"), ("-3e38", "-inf")):
            raw = ('{"instances": [1.0, %s]}' % x).encode()
            code, answer = request(s, "POST", "/v1/models/m:predict", raw=raw)
            assert code == 400, answer
            assert f"output 'y' is {shown} at index [1]" in answer["error"] and "NaN or Infinity" in answer["error"]
            code, answer = request(s, "POST", "/v1/models/m:predict", raw=('{"inputs": [%s]}' % x).encode())
            assert code == 400 and "output 'y'" in answer["error"]
        code, answer = request(s, "POST", "/v1/models/m:predict", {"instances": [1.0, 1e38]})  # finite: served
        assert code == 200 and answer["predictions"][0] == 3.0
        assert np.float32(answer["predictions"][1]) == np.float32(1e38) * np.float32(3)
    finally:
        s.stop()


def test_the_proxy_keeps_the_servers_refusal_of_a_number_beyond_a_double(server, inputs):
    """One request, one meaning: 1e400 is refused (rapidjson kParseErrorNumberTooBig, J:486-490)
    whether the row is complete (sent on as it came) or the proxy completed it (serving/proxy.py
    re-encodes it, and json.dumps would write the infinity it read as the token Infinity, which
    J:483-485 accepts)."""
    from tests.test_proxy import post, start_proxy

    _, url, stop = start_proxy({"PROXY_BACKEND": server.url, "PROXY_MODEL": "taxi"})
    try:
        full = json.dumps({"instances": [full_row(inputs, **FEATURES_CASH)]}).replace('"fare": 7.25', '"fare": 1e400')
        for raw in (full, json.dumps({"instances": [FEATURES_CASH]}).replace('"fare": 7.25', '"fare": 1e400')):
            assert "1e400" in raw
            code, answer, _ = post(url, None, raw=raw.encode())
            assert code == 400 and "Number too big to be stored in double." in answer["error"], (raw, answer)
        # "Infinity" in a text value meets the proxy's quick check, but no number overflows: served.
        code, answer, _ = post(url, {"instances": [dict(FEATURES_CASH, company="Infinity Cab")]})
        assert code == 200 and 0 <= answer["predictions"][0]["score"] <= 1
    finally:
        stop()


def test_a_missing_required_feature_is_refused_by_the_model(server, inputs):
    """Both servers run the model's own check (components/export.py), so both answer 400."""
    code, answer = request(server, "POST", "/v1/models/taxi:predict",
                           {"instances": [full_row(inputs, fare=7.25, payment_type="")]})
    assert code == 400 and "payment_type is required" in answer["error"]


def test_instance_columns_of_every_dtype_follow_tf_servings_value_rules():
    """J:286-346 AddValueToTensor, column by column over several instances: a number of either
    kind fills a float column, an int column takes only integers in its range, a bool column
    only true/false, a string column only strings; the element and key at fault are named
    (J:588-597). The rows are stacked in request order, as J:537-613 fills them."""
    from serving import json_tensor

    infos = {"f": 1, "d": 2, "i32": 3, "i64": 9, "b": 10, "s": 7}
    rows = [{"f": 1, "d": 0.5, "i32": -2 ** 31, "i64": 2 ** 63 - 1, "b": True, "s": "Cash"},
            {"f": 2.5, "d": float("nan"), "i32": 2 ** 31 - 1, "i64": -3, "b": False, "s": "Crédit"}]
    form, arrays = json_tensor.predict_request({"instances": rows}, infos)
    assert form == "row"
    expected = {"f": np.array([1.0, 2.5], np.float32), "d": np.array([0.5, np.nan]),
                "i32": np.array([-2 ** 31, 2 ** 31 - 1], np.int32), "i64": np.array([2 ** 63 - 1, -3], np.int64),
                "b": np.array([True, False])}
    for name, want in expected.items():
        assert arrays[name].dtype == want.dtype and arrays[name].shape == (2,), name
        np.testing.assert_array_equal(arrays[name], want)
    assert arrays["s"].dtype == object and arrays["s"].tolist() == [b"Cash", "Crédit".encode()]
    refused = [("i32", 2 ** 31, "Value: 2147483648 Type: Number is not of expected type: int32"),
               ("i64", 1.0, "Value: 1.0 Type: Number is not of expected type: int64"),
               ("i32", True, "Type: True is not of expected type: int32"),
               ("b", 1, "Type: Number is not of expected type: bool"),
               ("f", False, "Type: False is not of expected type: float"),
               ("s", 7, "Type: Number is not of expected type: string")]
    for name, value, needle in refused:
        bad = [rows[0], dict(rows[1], **{name: value})]
        with pytest.raises(json_tensor.ServingError) as error:
            json_tensor.predict_request({"instances": bad}, infos)
        assert error.value.code == "INVALID_ARGUMENT"
        assert f"Failed to process element: 1 key: {name} of 'instances' list" in error.value.message, name
        assert needle in error.value.message, (name, error.value.message)


def test_the_servers_flat_call_answers_as_the_keyword_call(server):
    """serving/core.py calls the signature flat, with the captures read at load
    (LoadedVersion.flat_call); the outputs equal the model's own keyword call's, bit for bit."""
    import tensorflow as tf

    from serving.core import Servables

    loaded = server.servables.repository.resolve("taxi")
    fn = loaded.signatures["serving_default"]
    assert loaded.flat_call("serving_default") is not None  # the taxi model takes the flat path
    specs = fn.structured_input_signature[1]
    numbers = np.array([12.5, np.nan, 0.0])
    strings = np.array([b"Cash", b"Credit Card", b"Cash"], dtype=object)  # payment_type is required
    inputs = {name: strings if spec.dtype == tf.string else numbers.astype(spec.dtype.as_numpy_dtype)
              for name, spec in specs.items()}
    want = {k: v.numpy() for k, v in fn(**{k: tf.constant(v, specs[k].dtype) for k, v in inputs.items()}).items()}
    got = Servables._call(loaded, "serving_default", inputs)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_float_outputs_are_written_as_tf_serving_writes_them():
    """J:124-165 WriteDecimal: 6 significant digits if they round-trip, else 9; '.0' on whole numbers."""
    from serving.json_tensor import decimal

    assert decimal(0.5) == "0.5" and decimal(1.0) == "1.0" and decimal(3.0e-5) == "3e-05"
    assert decimal(float(np.float32(0.1))) == "0.1"
    assert decimal(float(np.float32(0.123456789))) == "0.123456791"
    assert np.float32(decimal(float(np.float32(2 / 3)))) == np.float32(2 / 3)


def test_outputs_of_every_rank_are_written_as_rows_and_columns():
    """J:980-1066 MakeJsonFromTensors: row form, one object per instance holding each output's
    slice for it; columnar form, each output whole; bytes that are not UTF-8 as {"b64": ...}."""
    from serving.json_tensor import predict_response

    outputs = {"score": np.array([0.5, 0.25], np.float32), "probs": np.array([[0.1, 0.9], [1.0, 0.0]], np.float32),
               "ids": np.array([[[1, 2]], [[3, 4]]], np.int64), "ok": np.array([True, False]),
               "label": np.array([b"yes", b"\xff"], dtype=object), "none": np.zeros((2, 0), np.float32)}
    rows = json.loads(predict_response(outputs, "row"))
    assert rows == {"predictions": [
        {"score": 0.5, "probs": [0.1, 0.9], "ids": [[1, 2]], "ok": True, "label": "yes", "none": []},
        {"score": 0.25, "probs": [1.0, 0.0], "ids": [[3, 4]], "ok": False, "label": {"b64": "/w=="}, "none": []}]}
    columns = json.loads(predict_response(outputs, "columnar"))
    assert columns == {"outputs": {"score": [0.5, 0.25], "probs": [[0.1, 0.9], [1.0, 0.0]], "ids": [[[1, 2]], [[3, 4]]],
                                   "ok": [True, False], "label": ["yes", {"b64": "/w=="}], "none": [[], []]}}
    assert json.loads(predict_response({"probs": outputs["probs"]}, "row")) == {"predictions": [[0.1, 0.9], [1.0, 0.0]]}


# --- classify / regress (J:796-872, C:151-221, regressor.cc:146-205) -------------------------

def test_classify_needs_a_classification_signature_and_matches_predict(server, inputs):
    example = {"payment_type": "Cash", "fare": 7.25, "trip_miles": 1.1}
    # C:185-187: serving_default (the default signature) has many inputs, not one serialized example.
    code, answer = request(server, "POST", "/v1/models/taxi:classify", {"examples": [example]})
    assert code == 400 and answer["error"] == "Expected one input Tensor."
    code, answer = request(server, "POST", "/v1/models/taxi:classify",
                           {"signature_name": "classification", "examples": [example], "context": {"trip_start_hour": 14}})
    assert code == 200
    (result,) = answer["results"]  # J:1068-1101: [[label, score], ...] per example
    assert [label for label, _ in result] == ["no", "yes"]
    row = full_row(inputs, payment_type="Cash", fare=7.25, trip_miles=1.1, trip_start_hour=14.0)
    _, predicted = request(server, "POST", "/v1/models/taxi:predict", {"instances": [row]})
    np.testing.assert_allclose([s for _, s in result], predicted["predictions"][0]["probabilities"], atol=1e-6)
    # regressor.cc:154-157 and :180: no regression signature in a classifier.
    code, answer = request(server, "POST", "/v1/models/taxi:regress",
                           {"signature_name": "classification", "examples": [example]})
    assert code == 400 and "Expected one output Tensor." in answer["error"]


CLASSIFY_ERRORS = [
    ({"signature_name": "classification"}, "key 'examples' is expected and was not found", "J:838-841"),
    ({"signature_name": "classification", "examples": {}}, "Expecting 'examples' value to be an list/array", "J:843-846"),
    ({"signature_name": "classification", "examples": []}, "'examples' value is an empty array", "J:848-851"),
    ({"signature_name": "classification", "examples": [3]}, "Example must be JSON object but got JSON Number", "J:797-800"),
    ({"signature_name": "classification", "examples": [{"fare": None}]},
     "Feature: fare has element with unexpected JSON type: Null", "J:737-741"),
    ({"signature_name": "classification", "examples": [{"fare": [1.5, "x"]}]},
     "Unexpected element type in feature: fare expecting type: float", "J:713-733"),
    ({"signature_name": "classification", "examples": [{"fare": 2 ** 63}]},
     "has uint64_t element. Only int64_t is supported.", "J:784-788"),
    ({"signature_name": "nope", "examples": [{}]}, "No signature was found with the name: nope", "C:157-160"),
]


@pytest.mark.parametrize("body,needle,ref", CLASSIFY_ERRORS, ids=[c[2] for c in CLASSIFY_ERRORS])
def test_classify_errors(server, body, needle, ref):
    code, answer = request(server, "POST", "/v1/models/taxi:classify", body)
    assert code == 400 and needle in answer["error"], (ref, answer)


# --- REST and gRPC give the same answers ------------------------------------------------------

def test_grpc_answers_equal_rest(server, inputs):
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                         model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc)

    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    predictions = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    row = full_row(inputs, **FEATURES_CASH)
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "taxi"
    req.model_spec.version_label = "stable"
    for name, dtype in inputs.items():
        req.inputs[name].CopyFrom(tf.make_tensor_proto([row[name]], dtype=dtype))
    answer = predictions.Predict(req, timeout=30)
    assert (answer.model_spec.name, answer.model_spec.version.value, answer.model_spec.signature_name) == (
        "taxi", 1, "serving_default")
    _, rest = request(server, "POST", "/v1/models/taxi/labels/stable:predict", {"instances": [row]})
    grpc_out = {k: tf.make_ndarray(v) for k, v in answer.outputs.items()}
    assert set(grpc_out) == set(rest["predictions"][0])
    assert np.float32(rest["predictions"][0]["score"]) == grpc_out["score"][0]
    assert [np.float32(p) for p in rest["predictions"][0]["probabilities"]] == list(grpc_out["probabilities"][0])
    assert grpc_out["classes"][0].decode() == rest["predictions"][0]["classes"]

    creq = classification_pb2.ClassificationRequest()
    creq.model_spec.name, creq.model_spec.signature_name = "taxi", "classification"
    example = creq.input.example_list.examples.add()
    example.features.feature["payment_type"].bytes_list.value.append(b"Cash")
    example.features.feature["fare"].float_list.value.append(7.25)
    classes = predictions.Classify(creq, timeout=30).result.classifications[0].classes
    _, rest = request(server, "POST", "/v1/models/taxi:classify",
                      {"signature_name": "classification", "examples": [{"payment_type": "Cash", "fare": 7.25}]})
    assert [[c.label, np.float32(c.score)] for c in classes] == [[l, np.float32(s)] for l, s in rest["results"][0]]

    with pytest.raises(grpc.RpcError) as bad:
        req.model_spec.version_label = "gold"
        predictions.Predict(req, timeout=30)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # the same rule as REST's 400
    with pytest.raises(grpc.RpcError) as bad:
        req.inputs.pop("fare")
        req.model_spec.version_label = "stable"
        predictions.Predict(req, timeout=30)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "Missing but required: {fare}" in bad.value.details()

    mreq = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    mreq.model_spec.name = "taxi"
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    predictions.GetModelMetadata(mreq, timeout=30).metadata["signature_def"].Unpack(signature_map)
    _, meta = request(server, "GET", "/v1/models/taxi/metadata")
    assert set(signature_map.signature_def) == set(meta["metadata"]["signature_def"]["signature_def"])

    status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
        get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "taxi"}), timeout=30)
    assert [(s.version, s.state) for s in status.model_version_status] == [(1, 30)]  # 30: AVAILABLE
    channel.close()


# --- request bodies on the wire (evhttp_request.cc:160-290) -----------------------------------

def _predict_head(length_header: str, extra: str = "") -> bytes:
    return (f"POST /v1/models/taxi:predict HTTP/1.1\r\nHost: x\r\n{length_header}{extra}"
            f"Connection: close\r\n\r\n").encode()


def test_gzip_and_chunked_bodies_are_read(server, inputs):
    body = json.dumps({"instances": [full_row(inputs, **FEATURES_CASH)]}).encode()
    packed = gzip.compress(body)
    answer = raw_http(server, _predict_head(f"Content-Length: {len(packed)}\r\n", "Content-Encoding: gzip\r\n") + packed)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]  # evhttp_request.cc:261-269
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 50]), body[i:i + 50]) for i in range(0, len(body), 50))
    answer = raw_http(server, _predict_head("Transfer-Encoding: chunked\r\n") + chunked + b"0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


@pytest.mark.parametrize("head", [
    "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",  # request smuggling (RFC 9112 6.1)
    "Content-Length: -1\r\n",
    "Content-Length: 5, 6\r\n",
    "Transfer-Encoding: gzip\r\n",
    f"Content-Length: {8 * 1024 * 1024 + 1}\r\n",  # STRICTER: TF Serving sets no body limit
])
def test_framing_that_could_smuggle_or_flood_is_refused_unread(server, inputs, head):
    answer = raw_http(server, _predict_head(head) + b"{}")
    assert answer.startswith(b"HTTP/1.1 4"), answer[:200]
    code, _ = request(server, "POST", "/v1/models/taxi:predict", {"instances": [full_row(inputs, **FEATURES_CASH)]})
    assert code == 200  # still serving


def test_options_preflight_follows_tf_serving(server):
    ok = raw_http(server, b"OPTIONS /v1/models/taxi:predict HTTP/1.1\r\nHost: x\r\nOrigin: http://a\r\n"
                          b"Connection: close\r\n\r\n")
    bad = raw_http(server, b"OPTIONS /v1/models/taxi:predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200") and bad.startswith(b"HTTP/1.1 400")  # HS:170-178


