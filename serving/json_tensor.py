"""TF Serving's JSON <-> tensor rules: the one owner of the REST body format.

The specification is tensorflow/serving's tensorflow_serving/util/json_tensor.cc (cited by line
below and in tests/test_serving_conformance.py). Requests become numpy arrays in the signature's
dtypes, outputs become JSON text exactly as TF Serving writes it, and clients (sandbox replay,
parity, batch prediction tools) build request rows with `instances`, so every sender uses the
one wire form of a missing value: NaN for a number, "" for a string, every named input present.

Deliberately stricter than TF Serving, each said again in the conformance tests:
- a body that is not UTF-8 is refused (rapidjson without kParseValidateEncodingFlag passes the
  bytes through);
- JSON nested deeper than Python's parser allows (about 1,000 levels) is refused with a 400
  (rapidjson's iterative parser takes any depth and ignores unknown top-level keys);
- an output value that is NaN or infinite fails the request with INVALID_ARGUMENT naming the
  output and row (TF Serving writes the non-standard tokens NaN / Infinity, which most JSON
  parsers refuse); a string output that is not UTF-8 is written as {"b64": ...}.
"""

import base64
import json
import math
import struct
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from serving.wire import ServingError, finite_double, invalid

INT32 = (-2 ** 31, 2 ** 31 - 1)
INT64 = (-2 ** 63, 2 ** 63 - 1)
UINT32 = (0, 2 ** 32 - 1)
UINT64 = (0, 2 ** 64 - 1)
MAX_DEBUG_BYTES = 256  # json_tensor.cc:225 kMaxJsonDebugStringBytes

# TensorFlow DataType enum values (types.proto) -> (DataTypeString name, numpy dtype).
DTYPES = {
    1: ("float", np.float32), 2: ("double", np.float64), 3: ("int32", np.int32), 4: ("uint8", np.uint8),
    5: ("int16", np.int16), 6: ("int8", np.int8), 7: ("string", object), 9: ("int64", np.int64),
    10: ("bool", np.bool_), 17: ("uint16", np.uint16), 19: ("half", np.float16),
    22: ("uint32", np.uint32), 23: ("uint64", np.uint64),
}
DT_FLOAT, DT_DOUBLE, DT_STRING, DT_INT64, DT_BOOL, DT_HALF = 1, 2, 7, 9, 10, 19
_FLOATS = {DT_FLOAT, DT_DOUBLE, DT_HALF}
_INT_RANGES = {3: INT32, 4: INT32, 5: INT32, 6: INT32, 9: INT64, 22: UINT32, 23: UINT64}


def dtype_name(dtype: int) -> str:
    return DTYPES.get(dtype, (f"type{dtype}", None))[0]


# --- parsing -------------------------------------------------------------------------------

def _parse_int(text: str):
    # rapidjson keeps integers that fit int64/uint64 as integers, anything larger as a double.
    if len(text) <= 20:
        value = int(text)
        if INT64[0] <= value <= UINT64[1]:
            return value
    return finite_double(text)


_DECODER = json.JSONDecoder(parse_int=_parse_int, parse_float=finite_double)


def loads(raw: bytes) -> Dict[str, Any]:
    """json_tensor.cc:473-501 ParseJson: NaN / Infinity accepted (kParseNanAndInfFlag), the top
    level must be an object; errors are INVALID_ARGUMENT 'JSON Parse error: ...'."""
    if not raw:
        raise invalid("JSON Parse error: The document is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise invalid(f"JSON Parse error: Invalid encoding in string. at offset: {e.start} "
                      f"(send the body as UTF-8)") from None
    try:
        doc = _DECODER.decode(text)
    except ServingError:
        raise
    except RecursionError:
        raise invalid("JSON Parse error: nesting too deep (this server takes at most about 1,000 levels)") from None
    except ValueError as e:
        message = getattr(e, "msg", str(e))
        raise invalid(f"JSON Parse error: {message} at offset: {getattr(e, 'pos', 0)}") from None
    if "\\u" in text and _has_lone_surrogate(doc):
        raise invalid("JSON Parse error: The surrogate pair in string is invalid.")
    if not isinstance(doc, dict):
        raise invalid(f"JSON Value: {debug_string(doc)} Is not object")
    return doc


def _has_lone_surrogate(doc: Any) -> bool:
    stack = [doc]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
    return False


def json_type(value: Any) -> str:
    """json_tensor.cc:95-112 JsonTypeString."""
    if value is None:
        return "Null"
    if value is True:
        return "True"
    if value is False:
        return "False"
    if isinstance(value, dict):
        return "Object"
    if isinstance(value, list):
        return "Array"
    if isinstance(value, str):
        return "String"
    return "Number"


def debug_string(value: Any) -> str:
    """A JSON value as TF Serving prints it in errors (json_tensor.cc:227-235): objects pretty
    printed with 4 spaces, arrays on one line, cut at 256 bytes."""
    out: List[str] = []

    class Stop(Exception):
        pass

    def write(v: Any, indent: int) -> None:
        if sum(map(len, out)) > MAX_DEBUG_BYTES:
            raise Stop
        if isinstance(v, dict):
            if not v:
                out.append("{}")
                return
            out.append("{\n")
            for i, (k, item) in enumerate(v.items()):
                out.append(" " * (indent + 4) + json.dumps(k) + ": ")
                write(item, indent + 4)
                out.append(",\n" if i < len(v) - 1 else "\n")
            out.append(" " * indent + "}")
        elif isinstance(v, list):
            out.append("[")
            for i, item in enumerate(v):
                write(item, indent)
                if i < len(v) - 1:
                    out.append(", ")
            out.append("]")
        elif isinstance(v, float) and not math.isfinite(v):
            raise Stop  # rapidjson's writer stops at NaN / Infinity
        else:
            out.append(json.dumps(v))

    try:
        write(value, 0)
    except Stop:
        pass
    return "".join(out)[:MAX_DEBUG_BYTES]


# --- request values -> tensors -------------------------------------------------------------

def _type_error(value: Any, dtype: int) -> ServingError:
    return invalid(f"JSON Value: {debug_string(value)} Type: {json_type(value)} is not of expected type: "
                   f"{dtype_name(dtype)}")


def _b64(value: Any) -> bytes:
    """json_tensor.cc:356-389: {"b64": "<base64>"} with that one key."""
    if not (isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)):
        raise invalid(f"JSON Value: {debug_string(value)} not formatted correctly for base64 data")
    text = value["b64"]
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except ValueError:
        raise invalid("Unable to base64 decode") from None


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _scalar(value: Any, dtype: int) -> Any:
    """json_tensor.cc:286-346 AddValueToTensor, plus the b64 object for strings (:395-406)."""
    kind = type(value)
    if dtype in _FLOATS:
        if kind is float or kind is int:
            return value
    elif dtype == DT_STRING:
        if kind is str:
            return value.encode("utf-8")
        if kind is dict:
            return _b64(value)
    elif dtype == DT_BOOL:
        if kind is bool:
            return value
    elif dtype in _INT_RANGES:
        low, high = _INT_RANGES[dtype]
        if kind is int and low <= value <= high:
            return value
    else:
        raise invalid(f"Conversion of JSON Value: {debug_string(value)} to type: {dtype_name(dtype)} "
                      f"is not supported")
    raise _type_error(value, dtype)


def _shape(value: Any) -> List[int]:
    """json_tensor.cc:348-355 GetDenseTensorShape: follow the first element down."""
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def _fill(value: Any, level: int, shape: List[int], dtype: int, out: List[Any]) -> None:
    """json_tensor.cc:391-431 FillTensorProto: every leaf at the same depth, every list the
    size the first element set."""
    if not isinstance(value, list):
        if level != len(shape):
            raise invalid(f"JSON Value: {debug_string(value)} found at incorrect level: {level + 1} in the JSON "
                          f"DOM. Expected at level: {len(shape)}")
        out.append(_scalar(value, dtype))
        return
    if level >= len(shape):
        raise invalid(f"Encountered list at unexpected level: {level} expected < {len(shape)}")
    if len(value) != shape[level]:
        raise invalid(f"Encountered list at unexpected size: {len(value)} at level: {level} expected size: "
                      f"{shape[level]}")
    for item in value:
        _fill(item, level + 1, shape, dtype, out)


# DataType -> the Python types of a JSON scalar that _scalar passes through unchanged for it (a
# str is encoded): a column of only these needs no per-value call.
_PLAIN = {**{d: {float, int} for d in _FLOATS}, **{d: {int} for d in _INT_RANGES}, DT_BOOL: {bool}, DT_STRING: {str}}


def _array(flat: List[Any], shape: Sequence[int], dtype: int) -> np.ndarray:
    np_dtype = DTYPES[dtype][1]
    if dtype == DT_STRING:
        array = np.empty(len(flat), dtype=object)
        array[:] = flat
        return array.reshape(shape)
    return np.asarray(flat, dtype=np_dtype).reshape(shape)


def tensor(value: Any, dtype: int) -> np.ndarray:
    shape = _shape(value)
    flat: List[Any] = []
    _fill(value, 0, shape, dtype, flat)
    return _array(flat, shape, dtype)


def _instances(instances: List[Any], infos: Dict[str, int]) -> Dict[str, np.ndarray]:
    """json_tensor.cc:537-613 FillTensorMapFromInstancesList."""
    if not _is_object(instances[0]) and len(infos) > 1:
        raise invalid("instances is a plain list, but expecting list of objects as multiple input tensors "
                      "required as per tensorinfo_map")
    objects = _is_object(instances[0])
    names = sorted(infos)
    columns: Dict[str, List[Any]] = {name: [] for name in names}
    for i, item in enumerate(instances):
        if objects:
            if not _is_object(item):
                raise invalid(f"Expecting object but got list at item {i} of input list")
            for name, value in item.items():
                if name not in infos:
                    raise invalid(f"Failed to process element: {i} key: {name} of 'instances' list. Error: "
                                  f"INVALID_ARGUMENT: JSON object: does not have named input: {name}")
                columns[name].append(value)
            if len(item) != len(names):
                raise invalid(f"Failed to process element: {i} of 'instances' list. JSON object: "
                              f"{debug_string(item)} keys must be equal to: {','.join(names)}")
        else:
            if _is_object(item):
                raise invalid(f"Expecting value/list but got object at item {i} of input list")
            columns[names[0]].append(item)
    return {name: _stack(name, columns[name], infos[name], objects) for name in names}


def _stack(name: str, values: List[Any], dtype: int, keyed: bool) -> np.ndarray:
    """Each instance's value for one input, stacked on a new batch dimension; all the same shape."""
    def failed(i: int, error: ServingError) -> ServingError:
        key = f" key: {name}" if keyed else ""
        return invalid(f"Failed to process element: {i}{key} of 'instances' list. Error: "
                       f"INVALID_ARGUMENT: {error.message}")

    kinds = set(map(type, values))
    if kinds <= _PLAIN.get(dtype, set()):  # one plain scalar per row, each of a type _scalar takes as is
        if dtype == DT_STRING:
            array = np.empty(len(values), dtype=object)
            array[:] = [v.encode("utf-8") for v in values]
            return array
        low_high = _INT_RANGES.get(dtype)
        if low_high is None or (low_high[0] <= min(values) and max(values) <= low_high[1]):
            return np.array(values, dtype=DTYPES[dtype][1])
    if not kinds & {list, dict}:  # one scalar per row, some of them refused or converted
        flat = []
        for i, v in enumerate(values):
            try:
                flat.append(_scalar(v, dtype))
            except ServingError as e:
                raise failed(i, e) from None
        return _array(flat, [len(values)], dtype)
    flat: List[Any] = []
    first_shape, first_size = None, None
    for i, v in enumerate(values):
        shape, start = _shape(v), len(flat)
        try:
            _fill(v, 0, shape, dtype, flat)
        except ServingError as e:
            raise failed(i, e) from None
        size = len(flat) - start
        if first_shape is None:
            first_shape, first_size = shape, size
        elif size != first_size:
            raise failed(i, invalid(f"Expecting tensor size: {first_size} but got: {size}"))
        elif shape != first_shape:
            raise failed(i, invalid(f"Expecting shape [{','.join(map(str, first_shape))}] but got: "
                                    f"[{','.join(map(str, shape))}]"))
    return _array(flat, [len(values)] + first_shape, dtype)


def _is_object(value: Any) -> bool:
    return isinstance(value, dict) and not _is_b64(value)


def _inputs(inputs: Any, infos: Dict[str, int]) -> Dict[str, np.ndarray]:
    """json_tensor.cc:615-660 FillTensorMapFromInputsMap."""
    if not isinstance(inputs, dict) or _is_b64(inputs):
        if len(infos) > 1:
            raise invalid("inputs is a plain value/list, but expecting an object as multiple input tensors "
                          "required as per tensorinfo_map")
        name = next(iter(infos))
        return {name: tensor(inputs, infos[name])}
    out = {}
    for name in sorted(infos):
        if name not in inputs:
            raise invalid(f"Missing named input: {name} in 'inputs' object.")
        out[name] = tensor(inputs[name], infos[name])
    return out


def signature_name(doc: Dict[str, Any]) -> str:
    """json_tensor.cc:503-516 FillSignature."""
    name = doc.get("signature_name", "")
    if not isinstance(name, str):
        raise invalid(f"JSON Value: {debug_string(doc)} not formatted correctly. 'signature_name' key must be "
                      f"a string value.")
    return name


def _nonempty_list(doc: Dict[str, Any], key: str, not_a_list: str, empty: str) -> List[Any]:
    """doc[key] as a non-empty list, with TF Serving's message (about the whole doc) if it is not."""
    value = doc[key]
    if not isinstance(value, list):
        raise invalid(f"JSON Value: {debug_string(doc)} {not_a_list}")
    if not value:
        raise invalid(f"JSON Value: {debug_string(doc)} {empty}")
    return value


def predict_request(doc: Dict[str, Any], infos: Dict[str, int]) -> Tuple[str, Dict[str, np.ndarray]]:
    """json_tensor.cc:662-705 FillPredictRequestFromJson: (format 'row' | 'columnar', input arrays).
    `infos` maps the signature's input names to their DataType enum values."""
    if not infos:
        raise invalid("Failed to get input map for signature: DEFAULT")
    if "instances" in doc:
        if "inputs" in doc:
            raise invalid(f"JSON Value: {debug_string(doc)} Not formatted correctly expecting only one of 'inputs' "
                          f"or 'instances' keys to exist ")
        instances = _nonempty_list(doc, "instances", "Expecting 'instances' to be an list/array",
                                   "No values in 'instances' array")
        return "row", _instances(instances, infos)
    if "inputs" in doc:
        return "columnar", _inputs(doc["inputs"], infos)
    raise invalid("Missing 'inputs' or 'instances' key")


# --- :classify / :regress requests -> tf.Example ---------------------------------------------

def _feature_values(name: str, content: Any) -> Tuple[str, List[Any]]:
    """json_tensor.cc:735-793 AddValueToFeature over one feature's values: (kind, values)."""
    kind = None
    values: List[Any] = []
    for value in content if isinstance(content, list) else [content]:
        if value is None or isinstance(value, list) or (isinstance(value, dict) and not _is_b64(value)):
            raise invalid(f"Feature: {name} has element with unexpected JSON type: {json_type(value)}")
        if isinstance(value, bool):
            this, value = "int64", int(value)
        elif isinstance(value, dict):
            this, value = "bytes", _b64(value)
        elif isinstance(value, str):
            this, value = "bytes", value.encode("utf-8")
        elif isinstance(value, float):
            this = "float"
        else:
            if value > INT64[1]:
                raise invalid(f"Feature: {name} has uint64_t element. Only int64_t is supported.")
            this = "int64"
        if kind is not None and this != kind:
            raise invalid(f"Unexpected element type in feature: {name} expecting type: {kind}")
        kind = this
        values.append(value)
    return kind or "", values


def example(obj: Any) -> bytes:
    """json_tensor.cc:795-815 MakeExampleFromJsonObject, serialized."""
    from tensorflow.core.example import example_pb2

    if not isinstance(obj, dict):
        raise invalid(f"Example must be JSON object but got JSON {json_type(obj)}")
    out = example_pb2.Example()
    for name, content in obj.items():
        kind, values = _feature_values(name, content)
        feature = out.features.feature[name]
        if kind == "bytes":
            feature.bytes_list.value.extend(values)
        elif kind == "float":
            feature.float_list.value.extend(values)
        elif kind == "int64":
            feature.int64_list.value.extend(values)
    return out.SerializeToString()


def examples_request(doc: Dict[str, Any]) -> List[bytes]:
    """json_tensor.cc:817-856 FillClassifyRegressRequestFromJson: serialized examples, each
    prefixed with the serialized context (util.cc:183-200 joins them the same way)."""
    context = example(doc["context"]) if "context" in doc else b""
    if "examples" not in doc:
        raise invalid(f"JSON Value: {debug_string(doc)} When method is classify, key 'examples' is expected and "
                      f"was not found")
    examples = _nonempty_list(doc, "examples", "Expecting 'examples' value to be an list/array",
                              "'examples' value is an empty array")
    return [context + example(e) for e in examples]


# --- outputs -> JSON text --------------------------------------------------------------------

_FLOAT32 = struct.Struct("<f")


def _float32(value: float) -> float:
    """`value` rounded to float32, as np.float32(value) rounds it (a C cast; infinite past the
    float32 range), as a Python float: a struct round trip takes a fifth of the time of a numpy
    scalar, and an answer of 100 rows writes 300 of them."""
    try:
        return _FLOAT32.unpack(_FLOAT32.pack(value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def decimal(value: float, dtype: int = DT_FLOAT) -> str:
    """json_tensor.cc:124-165 WriteDecimal: six significant digits when they round-trip, else
    max_digits10 (9 for float, 17 for double); '.0' added to whole numbers."""
    if dtype == DT_DOUBLE:
        text = "%.6g" % value
        if float(text) != value:
            text = "%.17g" % value
    else:
        value32 = _float32(value)
        text = "%.6g" % value32
        if _float32(float(text)) != value32:
            text = "%.9g" % value32
    if "." not in text and "e" not in text:
        text += ".0"
    return text


def _finite(name: str, array: np.ndarray) -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = np.argwhere(~np.isfinite(array))[0]
        raise invalid(f"output '{name}' is {array[tuple(bad)]} at index {bad.tolist()}: JSON cannot carry NaN or "
                      f"Infinity (TF Serving would write a non-standard token); check that row's input values")


def _value_writer(name: str, array: np.ndarray):
    kind = array.dtype.kind
    if kind == "f":
        dtype = DT_DOUBLE if array.dtype == np.float64 else DT_FLOAT
        return lambda v: decimal(float(v), dtype)
    if kind == "b":
        return lambda v: "true" if v else "false"
    if kind in "iu":
        return lambda v: str(int(v))
    as_bytes = name.endswith("_bytes")  # json_tensor.cc:874-877 IsNamedTensorBytes

    def string(v: Any) -> str:
        raw = v if isinstance(v, bytes) else str(v).encode()
        if not as_bytes:
            try:
                return json.dumps(raw.decode("utf-8"))
            except UnicodeDecodeError:
                pass
        return '{"b64": "%s"}' % base64.b64encode(raw).decode()
    return string


def _write(array: np.ndarray, write) -> str:
    if not isinstance(array, np.ndarray):
        return write(array)
    if array.ndim == 0:
        return write(array.item() if array.dtype != object else array[()])
    return _write_nested(array.tolist(), write)


def _write_nested(values: List[Any], write) -> str:
    """A tolist() of an array (at least one dimension) as JSON: one tolist per array, not one per row."""
    if values and isinstance(values[0], list):
        return "[" + ", ".join(_write_nested(v, write) for v in values) + "]"
    return "[" + ", ".join(map(write, values)) + "]"


def _rows(array: np.ndarray, write) -> List[str]:
    """Each row of `array` (its first dimension) as _write writes that row."""
    return [_write_nested(v, write) if isinstance(v, list) else write(v) for v in array.tolist()]


def predict_response(outputs: Dict[str, np.ndarray], form: str) -> bytes:
    """json_tensor.cc:980-1066 MakeJsonFromTensors: 'predictions' (rows: bare values for one
    output, objects for several) or 'outputs' (columns)."""
    if not outputs:
        raise invalid("Cannot convert empty tensor map to JSON")
    writers = {}
    for name, array in outputs.items():
        _finite(name, array)
        writers[name] = _value_writer(name, array)
    if form == "columnar":
        if len(outputs) == 1:
            name, array = next(iter(outputs.items()))
            return ('{"outputs": ' + _write(array, writers[name]) + "}").encode()
        body = ", ".join(f"{json.dumps(n)}: {_write(a, writers[n])}" for n, a in outputs.items())
        return ('{"outputs": {' + body + "}}").encode()
    batch = None
    for name, array in outputs.items():
        if array.ndim == 0:
            raise invalid(f"Tensor name: {name} has no shape information ")
        if batch is not None and array.shape[0] != batch:
            raise invalid(f"Tensor name: {name} has inconsistent batch size: {array.shape[0]} expecting: {batch}")
        batch = array.shape[0]
    if len(outputs) == 1:
        name, array = next(iter(outputs.items()))
        rows = _rows(array, writers[name])
    else:
        columns = [(json.dumps(n), _rows(a, writers[n])) for n, a in outputs.items()]
        rows = ["{" + ", ".join(f"{key}: {texts[i]}" for key, texts in columns) + "}" for i in range(batch)]
    return ('{"predictions": [' + ", ".join(rows) + "]}").encode()


def _row_object(row: Dict[str, Any], keys: Dict[str, str], writers: Dict[str, Any]) -> str:
    return "{" + ", ".join(f"{keys[n]}: {_write(v, writers[n])}" for n, v in row.items()) + "}"


def prediction_row(row: Dict[str, np.ndarray]) -> str:
    """One row of a :predict answer with several outputs, as predict_response writes it (the same
    digits, b64 for bytes that are not UTF-8, INVALID_ARGUMENT for NaN or Infinity): what batch
    prediction writes, so a batch answer and a REST answer for the same row are the same text."""
    writers = {}
    for name, value in row.items():
        array = np.asarray(value)
        _finite(name, array)
        writers[name] = _value_writer(name, array)
    return _row_object(row, {n: json.dumps(n) for n in row}, writers)


def classify_response(results: List[List[Tuple[str, float]]]) -> bytes:
    """json_tensor.cc:1068-1101: {"results": [[[label, score], ...], ...]}."""
    if not results:
        raise invalid("Cannot convert empty ClassificationResults to JSON")
    for i, row in enumerate(results):
        for label, score in row:
            if not math.isfinite(score):
                raise invalid(f"score of class '{label}' in result {i} is {score}: JSON cannot carry NaN or Infinity")
    return ('{"results": [' + ", ".join(
        "[" + ", ".join(f"[{json.dumps(label)}, {decimal(score)}]" for label, score in row) + "]"
        for row in results) + "]}").encode()


def regress_response(values: List[float]) -> bytes:
    """json_tensor.cc:1103-1127: {"results": [value, ...]}."""
    if not values:
        raise invalid("Cannot convert empty RegressionResults to JSON")
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise invalid(f"regression result {i} is {v}: JSON cannot carry NaN or Infinity")
    return ('{"results": [' + ", ".join(decimal(v) for v in values) + "]}").encode()


# --- what clients send -------------------------------------------------------------------------

def instances(columns: Dict[str, Sequence[Any]]) -> List[Dict[str, Any]]:
    """Rows in the one wire form both servers take alike: every named input in every row, a
    missing number as NaN and a missing string as "" (the model fills them by its policy)."""
    names = list(columns)
    lists = []
    for name in names:
        values = columns[name]
        values = values.tolist() if isinstance(values, np.ndarray) else list(values)
        lists.append([v.decode("utf-8") if isinstance(v, bytes) else v for v in values])
    return [dict(zip(names, row)) for row in zip(*lists)]


def dumps(body: Any) -> bytes:
    """A request body as clients send it; NaN goes out as the token TF Serving's parser accepts."""
    return json.dumps(body, allow_nan=True).encode()
