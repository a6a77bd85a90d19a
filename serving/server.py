"""Local TensorFlow Serving twin: the REST API on tornado's HTTP server, gRPC on grpcio.

    python -m serving.server --model_config_file build/model_repository/models.config \\
        --rest_api_port 8501 --port 8500 [--enable_batching --batching_parameters_file F]
    python -m serving.server --model_name taxi --model_base_path build/model_repository/taxi

Flags are tensorflow_model_server's (model_servers/main.cc), with its defaults; the REST API
(serving/wire.py, serving/json_tensor.py) and gRPC (serving/grpc_server.py) answer through one
core (serving/core.py), so both give the same answers. Stricter than TF Serving on purpose: a
body limit (`--rest_api_max_body_bytes`), header/body/idle timeouts, a connection cap and a
bounded worker pool; every error body is JSON.

Why tornado: it is in the pinned stack already (no new pins for the serving image), it refuses a
request carrying both Transfer-Encoding and Content-Length and any transfer coding but chunked,
checks Content-Length before reading the body, times out slow headers and bodies, and gunzips
request bodies with the size limit applied to the decompressed bytes.
"""

import argparse
import asyncio
import concurrent.futures
import logging
import os
import re
import signal
import threading
import time
from typing import Optional, Tuple

from tornado import httputil
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop

from serving import json_tensor, metrics, model_config, wire
from serving.core import ModelSpec, Servables
from serving.repository import Repository
from serving.wire import ServingError

MAX_BODY_BYTES = 8 * 1024 * 1024
METRICS_PATH = "/monitoring/prometheus/metrics"
_ORIGIN = re.compile(r"https?://")


class RestApi:
    """One REST request -> (HTTP status, body, content type). Runs on a worker thread."""

    def __init__(self, servables: Servables):
        self.servables = servables

    def handle(self, method: str, target: str, body: bytes) -> Tuple[int, bytes, str]:
        started = time.perf_counter()
        model, api, status = "", "", "OK"
        try:
            if target.split("?", 1)[0] == METRICS_PATH and method == "GET":
                if target != METRICS_PATH:
                    raise wire.invalid(f"Unexpected path: {target}. Should be {METRICS_PATH}")
                return 200, metrics.page(), metrics.CONTENT_TYPE
            if not wire.is_api_path(target):
                raise ServingError("NOT_FOUND", f"Not found: {method} {target} (the API is under /v1/)")
            route = wire.parse(method, target)
            model, api = route.model, route.api
            spec = ModelSpec(route.model, route.version, route.label)
            if api == "status":
                out = _proto_json(self.servables.status(spec), preserve_names=False)
            elif api == "metadata":
                out = _metadata_json(self.servables.metadata(spec))
            else:
                doc = json_tensor.loads(body)
                spec.signature_name = json_tensor.signature_name(doc)
                out = self._call(api, spec, doc)
            return 200, out, "application/json"
        except ServingError as e:
            status = e.code
            return e.http_status, wire.error_body(e.message), "application/json"
        except Exception as e:  # a bug here must not take the server down: answer 500, log it
            logging.exception("internal error on %s %s", method, target[:200])
            status = "INTERNAL"
            return 500, wire.error_body(f"Internal error: {type(e).__name__}"), "application/json"
        finally:
            if model:
                name = model if self.servables.repository.knows(model) else metrics.UNKNOWN_MODEL
                metrics.REQUEST_COUNT.labels(name, status).inc()
                if status == "OK":
                    metrics.REQUEST_LATENCY.labels(name, api, "REST").observe((time.perf_counter() - started) * 1e6)

    def _call(self, api: str, spec: ModelSpec, doc) -> bytes:
        if api == "predict":
            loaded = self.servables.resolve(spec)
            infos = self.servables.input_infos(loaded, spec.signature_name)
            form, inputs = json_tensor.predict_request(doc, infos)
            spec.version, spec.label = loaded.version, None  # the version resolved above answers
            _, _, outputs = self.servables.predict(spec, inputs)
            return json_tensor.predict_response(outputs, form)
        examples = json_tensor.examples_request(doc)
        if api == "classify":
            return json_tensor.classify_response(self.servables.classify(spec, examples)[2])
        return json_tensor.regress_response(self.servables.regress(spec, examples)[2])


def _proto_json(message, preserve_names: bool) -> bytes:
    from google.protobuf import json_format

    return json_format.MessageToJson(message, including_default_value_fields=True,
                                     preserving_proto_field_name=preserve_names, indent=None).encode()


def _metadata_json(response) -> bytes:
    """http_rest_api_util.cc:147-201: model_spec and the unpacked SignatureDefMap."""
    from tensorflow_serving.apis import get_model_metadata_pb2

    signature_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signature_map)
    return (b'{"model_spec": ' + _proto_json(response.model_spec, True) + b', "metadata": {"signature_def": '
            + _proto_json(signature_map, True) + b"}}")


# --- HTTP on tornado ---------------------------------------------------------------------------

class _Exchange(httputil.HTTPMessageDelegate):
    """One request on a connection: collect the body, answer from the worker pool."""

    def __init__(self, frontend: "RestFrontend", connection):
        self.frontend, self.connection = frontend, connection
        self.chunks, self.size = [], 0

    def headers_received(self, start_line, headers):
        self.method, self.target, self.headers = start_line.method, start_line.path, headers
        return None

    def data_received(self, chunk):
        self.chunks.append(chunk)
        return None

    def finish(self):
        asyncio.ensure_future(self.frontend.respond(self))

    def on_connection_close(self):
        self.chunks = []


class RestFrontend(httputil.HTTPServerConnectionDelegate):
    def __init__(self, api: RestApi, workers: concurrent.futures.ThreadPoolExecutor, timeout_ms: int):
        self.api, self.workers, self.timeout = api, workers, timeout_ms / 1000.0 if timeout_ms > 0 else None

    def start_request(self, server_conn, request_conn):
        return _Exchange(self, request_conn)

    async def respond(self, exchange: _Exchange):
        method, target = exchange.method, exchange.target
        if method == "OPTIONS":  # CORS preflight (http_server.cc:170-178)
            ok = _ORIGIN.search(exchange.headers.get("Origin", "")) is not None
            return self._write(exchange, 200 if ok else 400, b"", None)
        body = b"".join(exchange.chunks)
        exchange.chunks = []
        future = asyncio.wrap_future(self.workers.submit(self.api.handle, method, target, body))
        try:
            code, payload, content_type = await asyncio.wait_for(future, self.timeout)
        except asyncio.TimeoutError:
            code, payload, content_type = 504, wire.error_body(
                f"Request timed out after {self.timeout * 1000:.0f} ms (--rest_api_timeout_in_ms)"), "application/json"
        self._write(exchange, code, payload if method != "HEAD" else b"", content_type)

    @staticmethod
    def _write(exchange: _Exchange, code: int, payload: bytes, content_type: Optional[str]):
        headers = httputil.HTTPHeaders({"Content-Length": str(len(payload))})
        if content_type:
            headers["Content-Type"] = content_type
        try:
            exchange.connection.write_headers(
                httputil.ResponseStartLine("HTTP/1.1", code, httputil.responses.get(code, "Unknown")), headers, payload)
            exchange.connection.finish()
        except Exception:  # the client went away: nothing to answer
            logging.debug("client gone before the answer to %s %s", exchange.method, exchange.target[:200])


class _CappedHTTPServer(HTTPServer):
    """At most `max_connections` open connections; one more is closed at once (the client's
    load balancer retries elsewhere) instead of holding memory for it."""

    def initialize(self, *args, max_connections: int = 1024, **kwargs):
        self.max_connections = max_connections
        super().initialize(*args, **kwargs)

    def handle_stream(self, stream, address):
        if len(self._connections) >= self.max_connections:
            stream.close()
            return
        super().handle_stream(stream, address)


class LocalServer:
    """REST (and gRPC when grpc_port is given) over one Servables, on an IOLoop thread."""

    def __init__(self, servables: Servables, host: str = "127.0.0.1", rest_port: int = 8501,
                 grpc_port: Optional[int] = None, num_threads: int = 0, timeout_ms: int = 30000,
                 max_connections: int = 1024, idle_timeout: float = 60.0, body_timeout: float = 30.0,
                 max_body_bytes: int = MAX_BODY_BYTES):
        self.servables = servables
        threads = num_threads or 4 * (os.cpu_count() or 1)  # TF Serving's --rest_api_num_threads default
        self.workers = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rest")
        self._ready = threading.Event()
        self._settings = dict(host=host, rest_port=rest_port, timeout_ms=timeout_ms, max_connections=max_connections,
                              idle_timeout=idle_timeout, body_timeout=body_timeout, max_body_bytes=max_body_bytes)
        self._thread = threading.Thread(target=self._run, daemon=True, name="rest-ioloop")
        self.grpc = None
        if grpc_port is not None:
            from serving.grpc_server import make_grpc_server

            self.grpc, self.grpc_port = make_grpc_server(servables, host, grpc_port, threads)

    def _run(self):
        asyncio.set_event_loop(asyncio.new_event_loop())
        self.loop = IOLoop.current()
        s = self._settings
        frontend = RestFrontend(RestApi(self.servables), self.workers, s["timeout_ms"])
        self.http = _CappedHTTPServer(frontend, max_connections=s["max_connections"], decompress_request=True,
                                      max_body_size=s["max_body_bytes"], max_header_size=64 * 1024,
                                      idle_connection_timeout=s["idle_timeout"], body_timeout=s["body_timeout"],
                                      no_keep_alive=False)
        sockets = __import__("tornado.netutil", fromlist=["bind_sockets"]).bind_sockets(
            s["rest_port"], address=s["host"], backlog=1024)
        self.http.add_sockets(sockets)
        self.rest_port = sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.start()

    def start(self) -> "LocalServer":
        self._thread.start()
        self._ready.wait(30)
        if self.grpc is not None:
            self.grpc.start()
        return self

    def stop(self) -> None:
        if self.grpc is not None:
            self.grpc.stop(grace=2).wait()
        if self._ready.is_set():
            async def close():
                self.http.stop()
                await self.http.close_all_connections()
                self.loop.stop()
            self.loop.add_callback(lambda: asyncio.ensure_future(close()))
            self._thread.join(10)
        self.workers.shutdown(wait=False, cancel_futures=True)

    @property
    def url(self) -> str:
        return f"http://{self._settings['host']}:{self.rest_port}"


def make_servables(args) -> Servables:
    """The model config and batching from tensorflow_model_server's flags."""
    batcher = None
    if args.batching_parameters_file and not args.enable_batching:
        raise SystemExit("server_options.batching_parameters_file is set without setting "
                         "server_options.enable_batching to true.")
    if args.enable_batching:
        from serving.batching import Batcher, read_parameters

        batcher = Batcher(read_parameters(args.batching_parameters_file) if args.batching_parameters_file else None)
    retry_seconds = max(args.load_retry_interval_micros, 0) / 1e6
    options = dict(poll_seconds=max(args.file_system_poll_wait_seconds, 0.05),
                   max_num_load_retries=args.max_num_load_retries, load_retry_interval=retry_seconds,
                   allow_labels_for_unavailable=args.allow_version_labels_for_unavailable_models)
    holder = {}

    def warm(loaded, log):
        holder["servables"].warm(loaded, log)

    if args.model_config_file:
        repo = Repository(config_file=args.model_config_file,
                          config_poll_seconds=args.model_config_file_poll_wait_seconds, warmup=warm, **options)
    else:
        if not args.model_base_path:
            raise SystemExit("Both server_options.model_base_path and server_options.model_config_file are empty!")
        repo = Repository.single(args.model_name, args.model_base_path, warmup=warm, **options)
    servables = Servables(repo, batcher, method_name_check=args.enable_signature_method_name_check)
    holder["servables"] = servables
    return servables


def _flag_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = p.add_argument
    add("--port", type=int, default=8500, help="gRPC port (0: no gRPC)")
    add("--rest_api_port", type=int, default=8501, help="REST port (TF Serving's default is 0: off)")
    add("--rest_api_num_threads", type=int, default=0, help="worker threads (default: 4 x CPUs)")
    add("--rest_api_timeout_in_ms", type=int, default=30000)
    add("--model_config_file", default="")
    add("--model_config_file_poll_wait_seconds", type=float, default=0)
    add("--model_name", default="default")
    add("--model_base_path", default="")
    add("--file_system_poll_wait_seconds", type=float, default=1)
    add("--max_num_load_retries", type=int, default=5)
    add("--load_retry_interval_micros", type=int, default=60 * 1000 * 1000)
    add("--enable_batching", type=_flag_bool, nargs="?", const=True, default=False)
    add("--batching_parameters_file", default="")
    add("--enable_signature_method_name_check", type=_flag_bool, nargs="?", const=True, default=False)
    add("--allow_version_labels_for_unavailable_models", type=_flag_bool, nargs="?", const=True, default=False)
    add("--monitoring_config_file", default="", help="accepted for TF Serving compatibility; metrics are always on")
    # Ours, not TF Serving's.
    add("--host", default="127.0.0.1")
    add("--port_file", help="write 'rest_port grpc_port' here once listening (use with port 0)")
    add("--rest_api_max_connections", type=int, default=1024)
    add("--rest_api_idle_timeout_seconds", type=float, default=60)
    add("--rest_api_max_body_bytes", type=int, default=MAX_BODY_BYTES)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        servables = make_servables(args)
    except model_config.ConfigError as e:
        raise SystemExit(str(e)) from None
    servables.repository.start()
    server = LocalServer(servables, args.host, args.rest_api_port, args.port or None, args.rest_api_num_threads,
                         args.rest_api_timeout_in_ms, args.rest_api_max_connections,
                         args.rest_api_idle_timeout_seconds, max_body_bytes=args.rest_api_max_body_bytes).start()
    if args.port_file:  # written whole (rename), after bind: a reader never sees a partial line
        with open(args.port_file + ".tmp", "w") as f:
            f.write(f"{server.rest_port} {server.grpc_port if server.grpc else 0}")
        os.replace(args.port_file + ".tmp", args.port_file)
    logging.info("serving %s: REST on %s, gRPC on %s", ", ".join(servables.repository.models()) or "(no models yet)",
                 server.url, f"{args.host}:{server.grpc_port}" if server.grpc else "off")
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    server.stop()
    servables.repository.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
