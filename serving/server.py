"""Local TF-Serving-compatible REST server (the embedded default behind `make serve`).

Speaks TensorFlow Serving's REST API over a model repository (see serving/repository.py):

    POST /v1/models/{m}[/versions/{n}|/labels/{l}]:predict    instances (rows) or inputs (columns)
    POST /v1/models/{m}[/versions/{n}|/labels/{l}]:classify   examples (+ context), tf.Example signature
    POST /v1/models/{m}[/versions/{n}|/labels/{l}]:regress
    GET  /v1/models/{m}[/versions/{n}|/labels/{l}]            model status
    GET  /v1/models/{m}[/versions/{n}|/labels/{l}]/metadata   signature defs
    GET  /monitoring/prometheus/metrics                       TF Serving's metric names

Errors are {"error": "..."} with TF Serving's codes (INVALID_ARGUMENT 400, NOT_FOUND 404).
A bad request is answered and logged; it never stops the server.

    python -m serving.server --model_base_path build/model_repository --port 8501
"""

import argparse
import base64
import json
import logging
import math
import os
import re
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional

import numpy as np
import prometheus_client as prom
import tensorflow as tf

from serving.repository import LoadedVersion, NotFound, Repository

MAX_BODY_BYTES = 8 * 1024 * 1024
EXAMPLE_SIGNATURE = "serving_tf_example"
_PATH = re.compile(r"^/v1/models/(?P<model>[^/:]+)(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
                   r"(?:(?P<metadata>/metadata)|:(?P<verb>predict|classify|regress))?$")

REGISTRY = prom.CollectorRegistry()
REQUEST_COUNT = prom.Counter(":tensorflow:serving:request_count", "Requests by model and status.",
                             ["model_name", "status"], registry=REGISTRY)
REQUEST_LATENCY = prom.Histogram(":tensorflow:serving:request_latency", "Request latency in microseconds.",
                                 ["model_name", "API", "entrypoint"], registry=REGISTRY,
                                 buckets=[100 * 1.8 ** i for i in range(20)])
RUNTIME_LATENCY = prom.Histogram(":tensorflow:serving:runtime_latency", "Model call latency in microseconds.",
                                 ["model_name", "API", "runtime"], registry=REGISTRY,
                                 buckets=[50 * 1.8 ** i for i in range(20)])


class BadRequest(ValueError):
    """INVALID_ARGUMENT -> HTTP 400; the message names the field at fault."""


class TooLarge(BadRequest):
    """A body over MAX_BODY_BYTES -> HTTP 413, refused before it is read."""


# --- JSON <-> tensors ----------------------------------------------------------------------

def _reject_constant(name: str):
    raise BadRequest(f"JSON value {name} is not allowed: send a number, or leave the feature out")


def parse_body(raw: bytes) -> Dict[str, Any]:
    try:
        body = json.loads(raw or b"{}", parse_constant=_reject_constant)
    except BadRequest:
        raise
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"malformed JSON request body: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def _missing_value(dtype: tf.DType):
    return "" if dtype == tf.string else math.nan


def _convert(name: str, values: List[Any], dtype: tf.DType) -> tf.Tensor:
    if dtype == tf.string:
        out = []
        for v in values:
            if isinstance(v, dict) and set(v) == {"b64"} and isinstance(v["b64"], str):
                try:
                    out.append(base64.b64decode(v["b64"], validate=True))
                except ValueError:
                    raise BadRequest(f"feature '{name}': invalid base64 in {{\"b64\": ...}}") from None
            elif isinstance(v, str):
                out.append(v.encode())
            else:
                raise BadRequest(f"feature '{name}': expected a string, got {type(v).__name__} ({v!r})")
        return tf.constant(out, tf.string)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise BadRequest(f"feature '{name}': expected a number, got {type(v).__name__} ({v!r})")
    return tf.constant(np.asarray(values, dtype=dtype.as_numpy_dtype))


def _rows_to_columns(instances: List[Any], specs: Dict[str, tf.TensorSpec], required=frozenset()) -> Dict[str, List[Any]]:
    if not isinstance(instances, list) or not instances:
        raise BadRequest("'instances' must be a non-empty list")
    columns = {name: [] for name in specs}
    for i, row in enumerate(instances):
        if len(specs) == 1 and not isinstance(row, dict):
            row = {next(iter(specs)): row}
        if not isinstance(row, dict):
            raise BadRequest(f"instances[{i}] must be an object of named features")
        unknown = sorted(set(row) - set(specs))
        if unknown:
            raise BadRequest(f"instances[{i}]: unknown feature '{unknown[0]}' (the signature takes: "
                             f"{', '.join(sorted(specs))})")
        absent = sorted(required - set(row))
        if absent:
            raise BadRequest(f"instances[{i}]: missing required feature '{absent[0]}'")
        for name, spec in specs.items():
            # An absent optional feature is a missing value, filled by the model's own policy.
            columns[name].append(row.get(name, _missing_value(spec.dtype)))
    return columns


def _columns(inputs: Any, specs: Dict[str, tf.TensorSpec], required=frozenset()) -> Dict[str, List[Any]]:
    if len(specs) == 1 and not isinstance(inputs, dict):
        inputs = {next(iter(specs)): inputs}
    if not isinstance(inputs, dict):
        raise BadRequest("'inputs' must be an object of named columns")
    unknown = sorted(set(inputs) - set(specs))
    if unknown:
        raise BadRequest(f"inputs: unknown feature '{unknown[0]}' (the signature takes: {', '.join(sorted(specs))})")
    absent = sorted(required - set(inputs))
    if absent:
        raise BadRequest(f"inputs: missing required feature '{absent[0]}'")
    sizes = {len(v) if isinstance(v, list) else -1 for v in inputs.values()}
    if -1 in sizes or len(sizes) != 1 or 0 in sizes:
        raise BadRequest("'inputs' columns must be non-empty lists of the same length")
    n = sizes.pop()
    return {name: inputs.get(name, [_missing_value(spec.dtype)] * n) for name, spec in specs.items()}


def _to_json(value: Any) -> Any:
    """numpy values (arrays, scalars, bytes) as JSON; bytes that are not UTF-8 as {"b64": ...}."""
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(value).decode()}
    if isinstance(value, np.ndarray):
        return [_to_json(v) for v in value] if value.dtype == object else value.tolist()
    return value.item() if isinstance(value, np.generic) else value


def _example(features: Dict[str, Any], where: str) -> bytes:
    """A JSON example (as in TF Serving's :classify / :regress) as a serialized tf.Example."""
    feature = {}
    for name, value in features.items():
        values = value if isinstance(value, list) else [value]
        if all(isinstance(v, str) for v in values):
            feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode() for v in values]))
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=values))
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=values))
        else:
            raise BadRequest(f"{where}: feature '{name}' must be strings or numbers, got {value!r}")
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


# --- the API -------------------------------------------------------------------------------

def _signature(loaded: LoadedVersion, name: Optional[str]):
    name = name or "serving_default"
    if not isinstance(name, str) or name not in loaded.signatures:
        raise BadRequest(f"serving signature name: '{name}' not found in signature def "
                         f"(available: {', '.join(sorted(loaded.signatures))})")
    return loaded.signatures[name]


def predict(loaded: LoadedVersion, body: Dict[str, Any]) -> Dict[str, Any]:
    if ("instances" in body) == ("inputs" in body):
        raise BadRequest("request must have exactly one of 'instances' (rows) or 'inputs' (columns)")
    fn = _signature(loaded, body.get("signature_name"))
    _, specs = fn.structured_input_signature
    required = loaded.required & set(specs)
    columns = (_rows_to_columns(body["instances"], specs, required) if "instances" in body
               else _columns(body["inputs"], specs, required))
    tensors = {name: _convert(name, columns[name], specs[name].dtype) for name in specs}
    started = time.perf_counter()
    try:
        outputs = {k: v.numpy() for k, v in fn(**tensors).items()}
    except (tf.errors.InvalidArgumentError, ValueError, TypeError) as e:
        raise BadRequest(f"the model rejected the input: {str(e).splitlines()[0]}") from None
    RUNTIME_LATENCY.labels(loaded.model, "predict", "TF").observe((time.perf_counter() - started) * 1e6)
    result = {k: _to_json(v) for k, v in outputs.items()}  # each output converted once, whole
    if "instances" in body:
        if len(result) == 1:
            return {"predictions": next(iter(result.values()))}
        names = list(result)
        return {"predictions": [dict(zip(names, values)) for values in zip(*result.values())]}
    return {"outputs": next(iter(result.values())) if len(result) == 1 else result}


def classify_or_regress(loaded: LoadedVersion, body: Dict[str, Any], verb: str) -> Dict[str, Any]:
    examples, context = body.get("examples"), body.get("context", {})
    if not isinstance(examples, list) or not examples:
        raise BadRequest("'examples' must be a non-empty list of objects")
    if not isinstance(context, dict):
        raise BadRequest("'context' must be an object")
    serialized = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict):
            raise BadRequest(f"examples[{i}] must be an object")
        serialized.append(_example({**context, **ex}, f"examples[{i}]"))
    fn = _signature(loaded, body.get("signature_name") or EXAMPLE_SIGNATURE)
    try:
        out = fn(examples=tf.constant(serialized))
    except (tf.errors.InvalidArgumentError, ValueError, TypeError) as e:
        raise BadRequest(f"the model rejected the examples: {str(e).splitlines()[0]}") from None
    if verb == "regress":
        if "value" not in out:
            raise BadRequest("this model does not regress: its signature has no 'value' output")
        return {"results": out["value"].numpy().tolist()}
    if "probabilities" not in out:
        raise BadRequest("this model does not classify: its signature has no 'probabilities' output")
    probabilities = out["probabilities"].numpy()
    classes = loaded.classes if len(loaded.classes) == probabilities.shape[1] else \
        [str(i) for i in range(probabilities.shape[1])]
    return {"results": [[[c, float(p)] for c, p in zip(classes, row)] for row in probabilities]}


def status(repo: Repository, model: str, version: Optional[int], label: Optional[str]) -> Dict[str, Any]:
    snapshot = repo.snapshot(model)
    ok = {"state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
    states = {v: ok for v in snapshot.versions}
    states.update({v: {"state": "END", "status": {"error_code": "UNKNOWN", "error_message": error}}
                   for v, error in snapshot.failed.items()})
    if label is not None or (version is not None and version not in snapshot.failed):
        chosen = [snapshot.resolve(model, version, label).version]
    elif version is not None:
        chosen = [version]
    else:
        chosen = sorted(states, reverse=True)
    return {"model_version_status": [{"version": str(v), **states[v]} for v in chosen]}


def metadata(loaded: LoadedVersion) -> Dict[str, Any]:
    signature_def = {}
    for name, fn in loaded.signatures.items():
        _, inputs = fn.structured_input_signature
        signature_def[name] = {
            "inputs": {k: {"dtype": s.dtype.name, "tensor_shape": s.shape.as_list(), "name": k}
                       for k, s in inputs.items()},
            "outputs": {k: {"dtype": s.dtype.name, "tensor_shape": s.shape.as_list(), "name": k}
                        for k, s in fn.structured_outputs.items()},
            "method_name": "tensorflow/serving/predict"}
    return {"model_spec": {"name": loaded.model, "signature_name": "", "version": str(loaded.version)},
            "metadata": {"signature_def": {"signature_def": signature_def}}}


# --- HTTP ----------------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    repo: Repository = None  # set by make_server
    protocol_version = "HTTP/1.1"  # keep-alive: clients and the proxy reuse connections
    # Headers and body leave in separate writes; with Nagle on, a keep-alive client waits for
    # the delayed ACK (~40 ms per request here).
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):  # access log at debug level, not on stderr
        logging.debug("%s " + fmt, self.address_string(), *args)

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def _handle(self, method: str):
        started = time.perf_counter()
        model, api, code = "", "unknown", 500
        try:
            if method == "GET" and self.path == "/monitoring/prometheus/metrics":
                return self._send(200, prom.generate_latest(REGISTRY), prom.CONTENT_TYPE_LATEST)
            match = _PATH.match(self.path.split("?", 1)[0])
            if not match:
                raise NotFound(f"Malformed request: {method} {self.path}")
            model = match["model"]
            version = self._version(match["version"])
            api = match["verb"] or ("metadata" if match["metadata"] else "status")
            body = self._read_body() if method == "POST" else {}
            if (method == "POST") != (match["verb"] is not None):
                raise BadRequest(f"{method} is not supported for {self.path}")
            if api == "status":
                result = status(self.repo, model, version, match["label"])
            else:
                loaded = self.repo.resolve(model, version, match["label"])
                if api == "metadata":
                    result = metadata(loaded)
                elif api == "predict":
                    result = predict(loaded, body)
                else:
                    result = classify_or_regress(loaded, body, api)
            code = 200
            self._send_json(code, result)
        except BadRequest as e:
            code = 413 if isinstance(e, TooLarge) else 400
            self._send_json(code, {"error": str(e)})
        except NotFound as e:
            code = 404
            self._send_json(code, {"error": str(e)})
        except Exception as e:  # a server bug: answer, log, keep serving
            logging.exception("internal error on %s %s", method, self.path)
            code = 500
            self._send_json(code, {"error": f"internal error: {type(e).__name__}: {e}"})
        finally:
            if model:
                REQUEST_COUNT.labels(model, "OK" if code == 200 else str(code)).inc()
                REQUEST_LATENCY.labels(model, api, "REST").observe((time.perf_counter() - started) * 1e6)

    @staticmethod
    def _version(text: Optional[str]) -> Optional[int]:
        if text is None:
            return None
        if not text.isdigit():
            raise BadRequest(f"version must be a positive integer, got '{text}'")
        return int(text)

    def _read_body(self) -> Dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise BadRequest("invalid Content-Length header") from None
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # do not read what we refuse
            raise TooLarge(f"request body too large: {length} bytes (limit {MAX_BODY_BYTES})")
        return parse_body(self.rfile.read(length))

    def _send_json(self, code: int, payload: Dict[str, Any]):
        self._send(code, json.dumps(payload).encode(), "application/json")

    def _send(self, code: int, data: bytes, content_type: str):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        # Headers and body in one write (end_headers() would flush the headers on their own).
        self._headers_buffer.append(b"\r\n" + data)
        self.wfile.write(b"".join(self._headers_buffer))
        self._headers_buffer = []


class Server(ThreadingHTTPServer):
    daemon_threads = True
    # The stdlib default backlog (5) resets connections under a burst of concurrent clients.
    request_queue_size = 256


def make_server(repo: Repository, host: str = "127.0.0.1", port: int = 8501) -> Server:
    handler = type("BoundHandler", (Handler,), {"repo": repo})
    return Server((host, port), handler)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_base_path", default="build/model_repository",
                        help="repository root: <root>/<model>/<version>/")
    parser.add_argument("--rest_api_port", "--port", type=int, default=8501)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--num_latest", type=int, default=2, help="versions kept loaded besides labelled ones")
    parser.add_argument("--poll_seconds", type=float, default=2.0)
    parser.add_argument("--port_file", help="write the bound port here once listening (use with --port 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    repo = Repository(args.model_base_path, num_latest=args.num_latest, poll_seconds=args.poll_seconds).start()
    server = make_server(repo, args.host, args.rest_api_port)
    if args.port_file:  # written whole (rename), after bind: a reader never sees a partial port
        with open(args.port_file + ".tmp", "w") as f:
            f.write(str(server.server_address[1]))
        os.replace(args.port_file + ".tmp", args.port_file)
    logging.info("serving %s on http://%s:%d", ", ".join(repo.models()) or "(no models yet)", args.host,
                 args.rest_api_port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        repo.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
