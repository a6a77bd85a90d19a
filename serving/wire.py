"""TF Serving's REST wire: the URL grammar, status codes, error bodies, and the rows of request
bodies and answers. Standard library only, so the proxy (which has no TensorFlow), the prediction
log's readers and the local server read URLs and rows by one set of rules.

The specification is tensorflow/serving's own source:
- tensorflow_serving/model_servers/http_rest_api_util.cc:31-34 (the two regexes, case-insensitive,
  matched against the whole path *and query*), :90-131 (ParseModelInfo: the model name and label
  are URL-decoded, the version must fit an int64);
- http_rest_api_handler.cc:65-109 (POST only for :predict/:classify/:regress, GET only for status
  and metadata; anything else is "Malformed request: <METHOD> <path>", INVALID_ARGUMENT);
- http_server.cc:46-85 (status code -> HTTP status), :139-150 (only paths matching
  "(?i)/v1/.*" reach the API; any other path is 404).
"""

import json
import math
import re
from typing import Any, Dict, List, NamedTuple, Optional
from urllib.parse import unquote_to_bytes

API_PATH = re.compile(r"/v1/.*", re.IGNORECASE | re.DOTALL)
# Python's re spells RE2's \d as [0-9] here: RE2's \d is ASCII-only, Python's is not.
PREDICTION_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/([0-9]+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)",
    re.IGNORECASE | re.DOTALL)
STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/([0-9]+))|(?:/labels/([^/:]+)))?(?:/(metadata))?",
    re.IGNORECASE | re.DOTALL)
INT64_MAX = 2 ** 63 - 1
# SignatureDef method names (tensorflow/core/saved_model/signature_constants.h): what the model
# export writes and what :classify / :regress check.
PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"

# absl status codes -> HTTP, as http_server.cc:46-85 maps them.
HTTP_STATUS = {
    "OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400, "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501,
    "INTERNAL": 500, "UNAVAILABLE": 503, "DATA_LOSS": 500, "UNAUTHENTICATED": 401,
}


class ServingError(Exception):
    """A failed call with TF Serving's status code (a key of HTTP_STATUS) and message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)


def invalid(message: str) -> ServingError:
    return ServingError("INVALID_ARGUMENT", message)


def finite_double(text: str) -> float:
    """A JSON number's text as a double; one beyond a double (1e400) is refused as TF Serving's
    parser refuses it (rapidjson reader.h kParseErrorNumberTooBig, reported by json_tensor.cc:486-490).
    The bare token Infinity is another matter: TF Serving accepts it (kParseNanAndInfFlag)."""
    value = float(text)
    if math.isinf(value):
        raise invalid("JSON Parse error: Number too big to be stored in double.")
    return value


class Route(NamedTuple):
    model: str
    version: Optional[int]
    label: Optional[str]
    api: str  # predict | classify | regress | status | metadata


def _decode(text: str, what: str) -> str:
    """curl_easy_unescape, as ParseModelInfo applies it: %XX sequences become bytes."""
    raw = unquote_to_bytes(text)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid(f"Failed to decode {what}:{text}") from None


def is_api_path(path: str) -> bool:
    return API_PATH.fullmatch(path) is not None


def parse(method: str, path: str) -> Route:
    """The route of a request to /v1/...; `path` is the request target (path and query, as sent)."""
    malformed = invalid(f"Malformed request: {method} {path}")
    if method == "POST":
        match = PREDICTION_PATH.fullmatch(path)
    elif method == "GET":
        match = STATUS_PATH.fullmatch(path)
    else:
        raise malformed
    if match is None:
        raise malformed
    model, version_text, label = match.group(1), match.group(2), match.group(3)
    model = _decode(model, "model name") if model else ""
    version = None
    if version_text:
        version = int(version_text)
        if version > INT64_MAX:
            raise invalid(f"Failed to convert version: {version_text} to numeric.")
    if label:
        label = _decode(label, "model version label")
    # The regexes ignore case, but the verb is compared as written (http_rest_api_handler.cc:85-103):
    # ":PREDICT" is malformed, "/METADATA" is a status request.
    if method == "POST":
        api = match.group(4)
        if api not in ("predict", "classify", "regress"):
            raise malformed
    else:
        api = "metadata" if match.group(4) == "metadata" else "status"
    if not model:
        raise invalid("Missing model name in request.")
    return Route(model, version, label or None, api)


def error_body(message: str) -> bytes:
    """{"error": "..."} (json_tensor.cc MakeJsonFromStatus); always valid JSON, any message."""
    return json.dumps({"error": message}).encode()


# --- answers -----------------------------------------------------------------------------
# What a 200 answer's rows are, for everything that reads answers back (the proxy's shadow
# comparison and fallback metrics, the A/B report): tensorflow/serving's
# util/json_tensor.cc writes :predict in the request's format, row ("predictions": one entry per
# instance) or columnar ("outputs": one list per named output, or the bare list or value of a
# single unnamed output), and :classify / :regress as "results" (one entry per example).

def is_number(value: Any) -> bool:
    """A JSON number (bool excluded, which Python counts as int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def one_element(value: Any) -> Any:
    """An output of shape [n, 1] arrives as one-element lists per row: the element."""
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def answer_rows(answer: Any, api: Optional[str] = None) -> Optional[List[Any]]:
    """The rows of an answer, or None when it has none readable. `api` (predict / classify /
    regress) picks the key the verb answers with; None takes whichever the answer carries."""
    if not isinstance(answer, dict):
        return None
    keys = ("results",) if api in ("classify", "regress") else ("predictions", "outputs") if api else (
        "predictions", "outputs", "results")
    key = next((k for k in keys if k in answer), None)
    if key is None:
        return None
    rows = answer[key]
    if key == "outputs":
        if isinstance(rows, dict) and rows and all(isinstance(v, list) for v in rows.values()):
            rows = [dict(zip(rows, values)) for values in zip(*rows.values())]
        elif is_number(rows):
            rows = [rows]
    return rows if isinstance(rows, list) else None


# --- request rows --------------------------------------------------------------------------
# What a request body's rows are, for everything that reads requests without the model (the
# proxy's row limit, fallback answers, unseen-category counts and log redaction; the prediction
# log's readers). The forms are tensorflow/serving's util/json_tensor.cc:
# - :predict row format, "instances": one entry per row, an object of named inputs or, for a
#   signature with one input, the bare value (FillTensorMapFromInstancesList, :537-613);
# - :predict columnar format, "inputs": an object of named inputs, each a list with one entry per
#   row or a single value (FillTensorMapFromInputsMap, :615-660), or the bare value/list of a
#   signature's one input; "instances" wins when a body has both (FillPredictRequestFromJson,
#   :662-705, refuses such a body; the rows here are what TF Serving would read first);
# - :classify / :regress, "examples": one object per row, with "context" merged into every one
#   (FillClassifyRegressRequestFromJson, :817-856). apis/input.proto:66-68 (ExampleListWithContext)
#   says the context is merged into each example; servables/tensorflow/util.cc:183-200 does it by
#   prefixing the serialized context to each serialized example, so a key in both takes the
#   example's value (protobuf's last-wins merge of a map entry).
# A columnar single value stands for every row (that is how the rows are counted and read back:
# the value a row was sent with); a list shorter than the longest leaves its later rows without
# that feature.

FEATURE_PLACES = ("instances", "inputs", "examples", "context")  # where a body names its features


def _is_b64(value: Any) -> bool:
    """{"b64": "..."}: one bytes value (json_tensor.cc:356-389), not an object of named inputs."""
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _is_named(value: Any) -> bool:
    return isinstance(value, dict) and not _is_b64(value)


def _column_rows(inputs: Dict[str, Any]) -> int:
    """Rows of a columnar object of named inputs: its longest list (a single value is one row)."""
    return max((len(v) if isinstance(v, list) else 1 for v in inputs.values()), default=0)


def request_row_count(body: Any) -> int:
    """len(request_rows(body)), without building the rows (the proxy counts every request)."""
    if isinstance(body, dict) and "instances" not in body and _is_named(body.get("inputs")):
        return _column_rows(body["inputs"])
    return len(request_rows(body))


def request_rows(body: Any) -> List[Any]:
    """The rows of a TF Serving request body, in order: each a {feature: value} dict, or the bare
    value where the signature has one unnamed input. [] for a body with no rows readable. The
    dicts of `instances` and context-free `examples` are the body's own: do not change them."""
    if not isinstance(body, dict):
        return []
    if "instances" in body:
        rows = body["instances"]
        return list(rows) if isinstance(rows, list) else []
    if "inputs" in body:
        inputs = body["inputs"]
        if not _is_named(inputs):
            return list(inputs) if isinstance(inputs, list) else [inputs]
        n = _column_rows(inputs)
        if all(isinstance(v, list) and len(v) == n for v in inputs.values()):  # the usual body
            return [dict(zip(inputs, values)) for values in zip(*inputs.values())]
        return [{k: (v[i] if isinstance(v, list) else v) for k, v in inputs.items()
                 if not isinstance(v, list) or i < len(v)} for i in range(n)]
    examples = body.get("examples")
    if not isinstance(examples, list):
        return []
    context = body.get("context")
    if not _is_named(context) or not context:
        return list(examples)
    return [{**context, **e} if _is_named(e) else e for e in examples]


def feature_rows(body: Any) -> List[Dict[str, Any]]:
    """The rows of request_rows that name their features ({feature: value}); a bare value of a
    one-input signature (a number, a list, a {"b64": ...}) is left out."""
    return [r for r in request_rows(body) if _is_named(r)]


def redact_request(body: Dict[str, Any], names: set, mark: str = "[redacted]") -> Dict[str, Any]:
    """A copy of `body` with the values of the features in `names` replaced by `mark`, wherever
    the body names features (FEATURE_PLACES: every instance, the inputs object, every example and
    the context), whichever of them request_rows reads: a redacted log keeps none of them."""
    def redacted(place):
        return {k: (mark if k in names else v) for k, v in place.items()} if _is_named(place) else place

    out = dict(body)
    for key in FEATURE_PLACES:
        value = out.get(key)
        if isinstance(value, list) and key in ("instances", "examples"):
            out[key] = [redacted(r) for r in value]
        elif key in ("inputs", "context") and value is not None:
            out[key] = redacted(value)
    return out
