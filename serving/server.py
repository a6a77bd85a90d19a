"""Local TensorFlow Serving twin: the REST API on aiohttp's HTTP server, gRPC on grpcio.

    python -m serving.server --model_config_file build/model_repository/models.config \\
        --rest_api_port 8501 --port 8500 [--enable_batching --batching_parameters_file F]
    python -m serving.server --model_name taxi --model_base_path build/model_repository/taxi

Flags are tensorflow_model_server's (model_servers/main.cc), with its defaults; the REST API
(serving/wire.py, serving/json_tensor.py) and gRPC (serving/grpc_server.py) answer through one
core (serving/core.py), so both give the same answers. Stricter than TF Serving on purpose: a
body limit (`--rest_api_max_body_bytes`), header/body/idle timeouts, a connection cap and a
bounded worker pool (serving/http.py, on aiohttp); every error body is JSON.
"""

import argparse
import asyncio
import gc
import logging
import os
import re
import signal
import threading
import time
from typing import Optional, Tuple

from serving import json_tensor, metrics, model_config, wire
from serving.core import ModelSpec, Servables, warm
from serving.http import MAX_BODY_BYTES, HttpServer, Request, Response
from serving.repository import Repository
from serving.wire import ServingError
METRICS_PATH = "/monitoring/prometheus/metrics"
_ORIGIN = re.compile(r"https?://")


class RestApi:
    """One REST request -> (HTTP status, body, content type): handle() on a worker thread, or,
    for a predict call with batching on, handle_async() on the event loop. Both run the one
    coroutine (_answer), which awaits `run(version, signature, inputs)` where it needs the model:
    on the event loop that waits for the batch; on a worker it is the blocking call itself, so
    the coroutine never suspends there and is run to its end in one step."""

    def __init__(self, servables: Servables):
        self.servables = servables

    def handle(self, method: str, target: str, body: bytes) -> Tuple[int, bytes, str]:
        coroutine = self._answer(method, target, body, self._run_here)
        try:
            coroutine.send(None)
        except StopIteration as done:
            return done.value
        coroutine.close()
        raise RuntimeError("a REST call on a worker thread waited on an event loop")

    async def _run_here(self, loaded, signature: str, inputs):
        return self.servables.run(loaded, signature, inputs)

    def batched_predict(self, method: str, target: str) -> bool:
        """Whether handle_async() answers this request: a predict call, with batching on."""
        if self.servables.batcher is None or method != "POST":
            return False
        try:
            return wire.parse(method, target).api == "predict"
        except ServingError:
            return False

    async def handle_async(self, method: str, target: str, body: bytes) -> Tuple[int, bytes, str]:
        return await self._answer(method, target, body, self.servables.run_async)

    async def _answer(self, method: str, target: str, body: bytes, run) -> Tuple[int, bytes, str]:
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
                out = await self._call(api, spec, doc, run)
            return 200, out, "application/json"
        except ServingError as e:
            status = e.code
            return e.http_status, wire.error_body(e.message), "application/json"
        except asyncio.CancelledError:  # past --rest_api_timeout_in_ms while in its batch: answered 504
            status = "DEADLINE_EXCEEDED"
            raise
        except Exception as e:  # a bug here must not take the server down: answer 500, log it
            logging.exception("internal error on %s %s", method, target[:200])
            status = "INTERNAL"
            return 500, wire.error_body(f"Internal error: {type(e).__name__}"), "application/json"
        finally:
            if model:
                metrics.record_request(model, self.servables.repository.knows(model), api, "REST", status, started)

    async def _call(self, api: str, spec: ModelSpec, doc, run) -> bytes:
        if api == "predict":
            loaded = self.servables.resolve(spec)
            infos = self.servables.input_infos(loaded, spec.signature_name)
            form, inputs = json_tensor.predict_request(doc, infos)
            loaded, name, _ = self.servables.check_predict(spec, inputs, loaded=loaded)  # the version resolved above
            outputs = await run(loaded, name, inputs)
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


class LocalServer:
    """REST (and gRPC when grpc_port is given) over one Servables."""

    def __init__(self, servables: Servables, host: str = "127.0.0.1", rest_port: int = 8501,
                 grpc_port: Optional[int] = None, num_threads: int = 0, timeout_ms: int = 30000,
                 max_connections: int = 1024, idle_timeout: float = 60.0, body_timeout: float = 30.0,
                 max_body_bytes: int = MAX_BODY_BYTES):
        self.servables, self.host = servables, host
        self.api = RestApi(servables)
        threads = num_threads or 4 * (os.cpu_count() or 1)  # TF Serving's --rest_api_num_threads default
        # With batching, a predict call waits for its batch on the event loop (awaited, no thread
        # held); any other request, and every request without batching, runs on the worker pool.
        self.http = HttpServer(self._handle, host, rest_port, threads, timeout_ms, max_connections, idle_timeout,
                               body_timeout, max_body_bytes, on_timeout=self._timed_out, name="rest",
                               inline_when_idle=servables.batcher is None,
                               on_loop=self._on_loop if servables.batcher is not None else None)
        self.timeout_ms = timeout_ms
        self.grpc = None
        if grpc_port is not None:
            from serving.grpc_server import make_grpc_server

            self.grpc, self.grpc_port = make_grpc_server(servables, host, grpc_port, threads)

    def _handle(self, request: Request) -> Response:
        if request.method == "OPTIONS":  # CORS preflight (http_server.cc:170-178): no body either way
            return Response(200 if _ORIGIN.search(request.headers.get("Origin", "")) else 400, b"", None)
        code, body, content_type = self.api.handle(request.method, request.target, request.body)
        return Response(code, body, content_type)

    def _on_loop(self, request: Request):
        """The coroutine answering a batched predict call on the event loop; None for the others."""
        if not self.api.batched_predict(request.method, request.target):
            return None
        return self._handle_async(request)

    async def _handle_async(self, request: Request) -> Response:
        return Response(*await self.api.handle_async(request.method, request.target, request.body))

    def _timed_out(self, request: Request) -> Response:
        return Response(504, wire.error_body(f"Request timed out after {self.timeout_ms} ms (--rest_api_timeout_in_ms)"))

    def start(self) -> "LocalServer":
        self.http.start()
        if self.grpc is not None:
            self.grpc.start()
        return self

    def stop(self) -> None:
        if self.grpc is not None:
            self.grpc.stop(grace=2).wait()
        self.http.stop()

    @property
    def rest_port(self) -> int:
        return self.http.port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.rest_port}"


def freeze_loaded_objects() -> None:
    """The Repository's on_change hook in the server process: collects what an unloaded version
    left, then moves every object alive (the loaded models' ~400,000) into the collector's
    permanent generation (gc.freeze), which collections skip. Unfrozen, each full collection
    walked them all: 350-470 ms with the GIL held, several times a minute under load (measured in
    bench-serving's 50-client run: the p99 spikes), stalling every request in flight. Frozen
    objects are never collected, so each change of versions unfreezes and collects first."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


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
    options = dict(poll_seconds=max(args.file_system_poll_wait_seconds, 0.05), on_change=freeze_loaded_objects,
                   max_num_load_retries=args.max_num_load_retries, load_retry_interval=retry_seconds,
                   allow_labels_for_unavailable=args.allow_version_labels_for_unavailable_models)
    if args.model_config_file:
        repo = Repository(config_file=args.model_config_file,
                          config_poll_seconds=args.model_config_file_poll_wait_seconds, warmup=warm, **options)
    else:
        if not args.model_base_path:
            raise SystemExit("Both server_options.model_base_path and server_options.model_config_file are empty!")
        repo = Repository.single(args.model_name, args.model_base_path, warmup=warm, **options)
    return Servables(repo, batcher, method_name_check=args.enable_signature_method_name_check)


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
    add("--tensorflow_intra_op_parallelism", type=int, default=0, help="threads inside one op (0: TensorFlow's choice)")
    add("--tensorflow_inter_op_parallelism", type=int, default=0, help="ops run at once (0: TensorFlow's choice)")
    # Ours, not TF Serving's.
    add("--host", default="127.0.0.1")
    add("--port_file", help="write 'rest_port grpc_port' here once listening (use with port 0)")
    add("--rest_api_max_connections", type=int, default=1024)
    add("--rest_api_idle_timeout_seconds", type=float, default=60)
    add("--rest_api_max_body_bytes", type=int, default=MAX_BODY_BYTES)
    return p


def apply_thread_flags(args) -> None:
    """--tensorflow_intra_op_parallelism / --tensorflow_inter_op_parallelism, as TF Serving's
    SessionOptions get them (0: TensorFlow's choice); set before the first model loads."""
    import tensorflow as tf

    if args.tensorflow_intra_op_parallelism > 0:
        tf.config.threading.set_intra_op_parallelism_threads(args.tensorflow_intra_op_parallelism)
    if args.tensorflow_inter_op_parallelism > 0:
        tf.config.threading.set_inter_op_parallelism_threads(args.tensorflow_inter_op_parallelism)


def main(argv=None) -> int:
    args = parser().parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    apply_thread_flags(args)
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
