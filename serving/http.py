"""The HTTP/1.1 server both the local TF Serving twin and the proxy run on: tornado's server,
with the request handled on a bounded worker pool. Standard library and tornado only, so the
proxy image needs no TensorFlow.

Why tornado: it is in the pinned stack already (no new pins for either image); it refuses a
request that carries both Transfer-Encoding and Content-Length, any transfer coding but
chunked, and unequal or non-numeric Content-Lengths; it checks Content-Length against the body
limit before reading the body; it times out slow headers (the idle timeout) and slow bodies;
and a refused request gets "400 Bad Request" and the connection closes. A body whose
Content-Encoding names gzip is gunzipped here (as TF Serving's evhttp_request.cc:261-269 does),
with the body limit applied to the decompressed bytes; one that is not gzip is a 400. Connections wait on one event loop,
so 4,000 idle clients hold no thread; at most `max_connections` are open at once.
"""

import asyncio
import concurrent.futures
import json
import logging
import os
import threading
import zlib
from typing import Awaitable, Callable, Dict, NamedTuple, Optional, Tuple

from tornado import httputil
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.netutil import bind_sockets

MAX_BODY_BYTES = 8 * 1024 * 1024
INLINE_BODY_BYTES = 16 * 1024  # the largest body an idle server may answer on its event loop


class Request(NamedTuple):
    method: str
    target: str  # path and query, as sent
    headers: httputil.HTTPHeaders
    body: bytes


class Response(NamedTuple):
    code: int
    body: bytes
    content_type: Optional[str] = "application/json"
    headers: Optional[Dict[str, str]] = None


class _Exchange(httputil.HTTPMessageDelegate):
    def __init__(self, server: "HttpServer", connection):
        self.server, self.connection, self.chunks = server, connection, []
        self.gone = False  # the client closed the connection: work not yet started is dropped

    def headers_received(self, start_line, headers):
        self.method, self.target, self.headers = start_line.method, start_line.path, headers

    def data_received(self, chunk):
        self.chunks.append(chunk)

    def finish(self):
        # Told when the client closes while its answer is being made (tornado watches the socket then).
        self.connection.set_close_callback(self.on_connection_close)
        self.server.received += 1
        asyncio.ensure_future(self.server.respond(self))

    def on_connection_close(self):
        self.chunks = []
        self.gone = True


class _Delegate(httputil.HTTPServerConnectionDelegate):
    def __init__(self, server: "HttpServer"):
        self.server = server

    def start_request(self, server_conn, request_conn):
        return _Exchange(self.server, request_conn)


class _CappedHTTPServer(HTTPServer):
    def initialize(self, *args, max_connections: int = 1024, **kwargs):
        self.max_connections = max_connections
        super().initialize(*args, **kwargs)

    def handle_stream(self, stream, address):
        if len(self._connections) >= self.max_connections:  # closed at once: not queued, not read
            stream.close()
            return
        super().handle_stream(stream, address)


class HttpServer:
    """`handler(Request) -> Response` runs on a pool of `num_threads` workers, or, when it is a
    coroutine function, on the event loop itself (the proxy: it only waits on its backend). The
    event loop runs on its own thread. `on_timeout(Request)` answers a request the handler did not
    finish within `timeout_ms` (a coroutine is cancelled; a worker's work goes on, its answer is
    dropped). A request whose client has gone before a worker takes it is never handled: a caller
    that gave up (the proxy at its deadline closes the connection) costs no model call. With
    `inline_when_idle`, a request with a small body that finds no other request on the server is
    answered on the event loop instead (no thread hop; its timeout is not enforced). `on_loop(Request)`
    may take a request with a small body onto the event loop: it returns a coroutine that answers
    it there (one that awaits work done elsewhere, so the loop is not held), or None to leave the
    request to the worker pool."""

    def __init__(self, handler: Callable[[Request], Response], host: str = "127.0.0.1", port: int = 0,
                 num_threads: int = 0, timeout_ms: int = 0, max_connections: int = 1024, idle_timeout: float = 60.0,
                 body_timeout: float = 30.0, max_body_bytes: int = MAX_BODY_BYTES,
                 on_timeout: Optional[Callable[[Request], Response]] = None, name: str = "http",
                 inline_when_idle: bool = False,
                 on_loop: Optional[Callable[[Request], Optional[Awaitable[Response]]]] = None):
        self.handler, self.on_timeout, self.on_loop = handler, on_timeout, on_loop
        self.is_async = asyncio.iscoroutinefunction(handler)
        self.inline_when_idle = inline_when_idle and not self.is_async
        self.received = 0  # requests read whole and not answered yet
        self.dropped = 0  # requests not handled because their client had gone
        self.timeout = timeout_ms / 1000.0 if timeout_ms > 0 else None
        threads = num_threads or 4 * (os.cpu_count() or 1)
        self.workers = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self.settings = dict(host=host, port=port, max_connections=max_connections, idle_timeout=idle_timeout,
                             body_timeout=body_timeout, max_body_bytes=max_body_bytes)
        self.host, self.port = host, None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"{name}-ioloop")

    def _run(self):
        asyncio.set_event_loop(asyncio.new_event_loop())
        self.loop = IOLoop.current()
        s = self.settings
        self.max_body_bytes = s["max_body_bytes"]
        self.http = _CappedHTTPServer(_Delegate(self), max_connections=s["max_connections"], decompress_request=False,
                                      max_body_size=s["max_body_bytes"], max_header_size=64 * 1024,
                                      idle_connection_timeout=s["idle_timeout"], body_timeout=s["body_timeout"])
        sockets = bind_sockets(s["port"], address=s["host"], backlog=1024)
        self.http.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.start()

    def start(self) -> "HttpServer":
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the HTTP server did not start")
        return self

    def _gunzip(self, body: bytes) -> bytes:
        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out = inflate.decompress(body, self.max_body_bytes + 1)
        if len(out) > self.max_body_bytes:
            raise ValueError(f"the body is over {self.max_body_bytes} bytes once decompressed")
        if not inflate.eof:
            raise ValueError("the gzip stream is cut short")
        return out

    async def respond(self, exchange: _Exchange):
        try:
            answer = await self._answer(exchange)
        finally:
            self.received -= 1
        if answer is not None:  # None: the client left before the work began
            self._write(exchange, *answer)

    async def _answer(self, exchange: _Exchange) -> Optional[Tuple[Response, bool]]:
        """(response, head_only) for one request read whole."""
        body = b"".join(exchange.chunks)
        exchange.chunks = []
        if "gzip" in exchange.headers.get("Content-Encoding", "").lower():
            try:
                body = self._gunzip(body)
            except (zlib.error, ValueError) as e:
                message = f"Content-Encoding gzip: the body cannot be decompressed ({e}); send gzip or drop the header"
                return Response(400, json.dumps({"error": message}).encode()), False
        request = Request(exchange.method, exchange.target, exchange.headers, body)
        head_only = request.method == "HEAD"
        if self.inline_when_idle and self.received == 1 and len(body) <= INLINE_BODY_BYTES:
            # Alone on the server: the two thread hops (loop -> worker -> loop) would cost more
            # than the call they wrap (0.2 ms of a 0.9 ms trivial round trip here). The loop reads
            # no other socket meanwhile, hence small bodies only; the timeout does not apply.
            try:
                return self.handler(request), head_only
            except Exception:
                return self._internal_error(request), head_only
        future = None
        if self.is_async:
            future = self.handler(request)
        elif self.on_loop is not None and len(body) <= INLINE_BODY_BYTES:
            future = self.on_loop(request)
        if future is None:
            future = asyncio.wrap_future(self.workers.submit(self._work, exchange, request))
        try:
            response = await asyncio.wait_for(future, self.timeout)
        except asyncio.TimeoutError:
            response = self.on_timeout(request) if self.on_timeout else Response(504, b'{"error": "timed out"}')
        except Exception:
            response = self._internal_error(request)
        return None if response is None else (response, head_only)

    @staticmethod
    def _internal_error(request: Request) -> Response:
        """The handler itself failed: a bug, answered as one."""
        logging.exception("unhandled error on %s %s", request.method, request.target[:200])
        return Response(500, b'{"error": "internal error"}')

    def _work(self, exchange: _Exchange, request: Request) -> Optional[Response]:
        if exchange.gone:
            self.dropped += 1
            return None
        return self.handler(request)

    def run(self, coroutine, timeout: float = 30.0):
        """Runs a coroutine on the server's event loop from another thread and returns its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop.asyncio_loop).result(timeout)

    @staticmethod
    def _write(exchange: _Exchange, response: Response, head_only: bool):
        body = b"" if head_only else response.body
        headers = httputil.HTTPHeaders({"Content-Length": str(len(body))})
        if response.content_type:
            headers["Content-Type"] = response.content_type
        for k, v in (response.headers or {}).items():
            headers[k] = v
        try:
            exchange.connection.write_headers(
                httputil.ResponseStartLine("HTTP/1.1", response.code, httputil.responses.get(response.code, "Unknown")),
                headers, body)
            exchange.connection.finish()
        except Exception:  # the client went away: nothing to answer
            logging.debug("client gone before the answer to %s %s", exchange.method, exchange.target[:200])

    def stop(self) -> None:
        if self._ready.is_set():
            async def close():
                self.http.stop()
                await self.http.close_all_connections()
                self.loop.stop()
            self.loop.add_callback(lambda: asyncio.ensure_future(close()))
            self._thread.join(10)
        self.workers.shutdown(wait=False, cancel_futures=True)
