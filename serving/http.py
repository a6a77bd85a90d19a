"""The HTTP/1.1 server both the local TF Serving twin and the proxy run on: aiohttp's low-level
server (`web.Server`), with the request handled on a bounded worker pool or on the event loop.
Standard library and aiohttp only (the proxy's backend client already), so the proxy image needs
no TensorFlow and no second web stack.

Why aiohttp's low-level server: per request it costs about half of tornado's. An empty POST round
trip, one keep-alive client, interleaved in one run (benchmarks/bench_http.py, 1-min load 8.8-9.5
on 2 shared cores): this server p50 0.28 ms, the tornado HttpServer it replaced 0.48-0.52 ms
(1.7-1.8x), a bare `web.Server` 0.26 ms; a one-route `web.Application` measured 0.30 ms, so the
router and middleware chain are left out (a second run, load 9.3-9.7: 0.36 ms vs tornado's
0.70-0.74 ms). Through the whole local server or the proxy the saving (0.2-0.4 ms) is inside
the noise of bench-serving and bench-proxy on this loaded machine. Its parser (llhttp, in C) is strict for requests: it
refuses a request with both Transfer-Encoding and Content-Length, a transfer coding that does not
end in chunked, a negative, non-numeric, list or repeated Content-Length, a repeated
Transfer-Encoding, bytes outside ASCII in the target, bare LF line ends and folded headers; each is
answered 400 with a JSON body naming the fault, and the connection closes (_Connection.handle_error:
aiohttp's own answer is plain text and logs a traceback per hostile request). What aiohttp
accepts and tornado did not is refused here: Transfer-Encoding 'gzip, chunked' (only chunked is
taken) and versions other than HTTP/1.0 and 1.1 (llhttp takes HTTP/0.9 and 2.0 request lines).
The declared Content-Length is checked against the body limit before the body is read (413,
unread, the connection closed; `Expect: 100-continue` is answered only after that check), a
chunked body is counted as it arrives, and the body must arrive within `body_timeout` (408). A
body whose Content-Encoding names gzip is gunzipped here (as TF Serving's evhttp_request.cc:261-269
does), with the body limit applied to the decompressed bytes; one that is not gzip is a 400.
aiohttp's keep-alive timer runs from a connection's start and from each answer until the next
request's headers are complete, so `idle_timeout` is both the header (slow-client) timeout and the
idle timeout. Request lines and header lines are capped at aiohttp's 8,190 bytes, 128 headers.
Connections wait on one event loop, so 4,000 idle clients hold no thread; at most
`max_connections` are open at once (_Connection.connection_made: aiohttp has no such setting).
"""

import asyncio
import concurrent.futures
import json
import logging
import os
import threading
import zlib
from typing import Awaitable, Callable, Dict, Mapping, NamedTuple, Optional, Tuple

from aiohttp import web, web_protocol
from aiohttp.http import HttpVersion10, HttpVersion11

MAX_BODY_BYTES = 8 * 1024 * 1024
INLINE_BODY_BYTES = 16 * 1024  # the largest body an idle server may answer on its event loop


class Request(NamedTuple):
    method: str
    target: str  # path and query, as sent
    headers: Mapping[str, str]  # case-insensitive (aiohttp's CIMultiDictProxy)
    body: bytes


class Response(NamedTuple):
    code: int
    body: bytes
    content_type: Optional[str] = "application/json"
    headers: Optional[Dict[str, str]] = None


class _Refused(Exception):
    """The request's framing or body is refused: answered with `code` and the connection closed."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def _error(code: int, message: str) -> web.Response:
    """An answer HttpServer makes itself (not its handler): JSON, and the connection closes after it."""
    response = web.Response(status=code, body=json.dumps({"error": message}).encode(),
                            headers={"Content-Type": "application/json"})
    response.force_close()
    return response


# What aiohttp answers a request its parser refused with (the parser has no version for it: 1.0).
_UNPARSED = web_protocol.ERROR._replace(version=HttpVersion11)


class _Connection(web_protocol.RequestHandler):
    """aiohttp's connection with the two things it has no setting for: the connection cap, and
    parser refusals answered as JSON naming the fault (aiohttp answers text and logs a traceback
    for each, which hostile input would turn into a flood)."""

    def connection_made(self, transport) -> None:
        manager = self._manager
        if len(manager._connections) >= manager.max_connections:  # closed at once: not queued, not read
            self._manager, self._force_close = None, True  # connection_lost then has nothing to undo
            transport.close()
            return
        super().connection_made(transport)

    def handle_error(self, request, status=500, exc=None, message=None) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the answer is partly sent; no error can follow it")
        if status != 400:  # not the client's fault: a bug here, answered as one
            logging.error("unhandled error on %s %s", request.method, request.raw_path[:200], exc_info=exc)
            return _error(500, "internal error")
        # llhttp's message: what is wrong, then the offending bytes, then a caret under them.
        lines = [line.strip() for line in (message or str(exc) or "unreadable").splitlines()]
        reason = " ".join(line for line in lines if line and line != "^")[:300]
        logging.debug("refused a request from %s: %s", request.remote, reason)
        return _error(400, f"malformed HTTP/1.1 request: {reason}; send one request line 'METHOD /path HTTP/1.1', "
                           f"valid header lines, and at most one of Content-Length or Transfer-Encoding: chunked")


class _Request(web.BaseRequest):
    ATTRS = web.BaseRequest.ATTRS | frozenset(["sent_version"])
    sent_version = None  # the HTTP version of a request line that is not HTTP/1.0 or 1.1


class _Server(web.Server):
    def __init__(self, handler, max_connections: int, **kwargs):
        super().__init__(handler, request_factory=self._request, **kwargs)
        self.max_connections = max_connections

    def __call__(self) -> _Connection:
        return _Connection(self, loop=self._loop, **self._kwargs)

    def _request(self, message, payload, protocol, writer, task) -> _Request:
        if message is web_protocol.ERROR:
            message = _UNPARSED
        request = _Request(message, payload, protocol, writer, task, self._loop)
        if message.version is not HttpVersion11 and message.version not in (HttpVersion10, HttpVersion11):
            # llhttp takes HTTP/0.9 and 2.0 request lines; refused in HttpServer._read_body, answered in 1.1.
            request.sent_version, request._version = message.version, HttpVersion11
        return request


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
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        s = self.settings
        self.max_body_bytes, self.body_timeout = s["max_body_bytes"], s["body_timeout"]
        # keepalive_timeout runs from the connection's start and from each answer until a request's
        # headers are complete: the header timeout and the idle timeout at once. lingering_time=0:
        # an answer that leaves the body unread (a refusal) closes the connection instead of
        # reading on. auto_decompress off: gzip is gunzipped here, under the body limit.
        self.server = _Server(self._serve, s["max_connections"], loop=self.loop, access_log=None,
                              keepalive_timeout=s["idle_timeout"], lingering_time=0, auto_decompress=False)
        self.listener = self.loop.run_until_complete(
            self.loop.create_server(self.server, s["host"], s["port"], backlog=1024, reuse_address=True))
        self.port = self.listener.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()

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

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        """The body, read whole within the body timeout; refused unread when its framing is one
        RFC 9112 section 6 forbids (or tornado, which this server replaced, refused) or its declared
        length is over the limit."""
        if request.sent_version is not None:
            version = request.sent_version
            raise _Refused(400, f"HTTP version {version.major}.{version.minor} is not served; send HTTP/1.1")
        coding = request.headers.get("Transfer-Encoding")
        if coding is not None and coding.strip().lower() != "chunked":  # aiohttp takes 'gzip, chunked' too
            raise _Refused(400, f"Transfer-Encoding '{coding}' is not supported; send chunked or Content-Length")
        if not request.body_exists:
            return b""
        declared = request.content_length
        if declared is not None and declared > self.max_body_bytes:
            raise _Refused(413, f"Content-Length {declared} is over the {self.max_body_bytes}-byte body limit")
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.body_timeout):
                async for chunk in request.content.iter_any():
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        raise _Refused(413, f"the chunked body is over the {self.max_body_bytes}-byte body limit")
                    chunks.append(chunk)
        except TimeoutError:
            raise _Refused(408, f"the body did not arrive within {self.body_timeout} s") from None
        except (web_protocol.RequestPayloadError, ConnectionError) as e:
            raise _Refused(400, f"the body is cut short or its chunked framing is malformed ({e})") from None
        return b"".join(chunks)

    async def _serve(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            body = await self._read_body(request)
        except _Refused as e:
            return _error(e.code, str(e))
        self.received += 1
        try:
            answer = await self._answer(request, body)
        finally:
            self.received -= 1
        if answer is None:  # the client left before the work began: nobody reads an answer
            return _error(499, "the client closed the connection")
        response, head_only = answer
        headers = {"Content-Type": response.content_type} if response.content_type else {}
        headers.update(response.headers or {})
        answer = web.Response(status=response.code, body=b"" if head_only else response.body, headers=headers)
        if headers.get("Connection", "").lower() == "close":  # aiohttp would keep the connection open after it
            answer.force_close()
        return answer

    async def _answer(self, connection: web.BaseRequest, body: bytes) -> Optional[Tuple[Response, bool]]:
        """(response, head_only) for one request read whole."""
        if "gzip" in connection.headers.get("Content-Encoding", "").lower():
            try:
                body = self._gunzip(body)
            except (zlib.error, ValueError) as e:
                message = f"Content-Encoding gzip: the body cannot be decompressed ({e}); send gzip or drop the header"
                return Response(400, json.dumps({"error": message}).encode()), False
        request = Request(connection.method, connection.raw_path, connection.headers, body)
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
            future = asyncio.wrap_future(self.workers.submit(self._work, connection.protocol, request))
        try:
            # asyncio.timeout rather than wait_for, which wraps a coroutine in a task of its own
            # (23 us a request here, on the event loop every request goes through); a coroutine
            # past the timeout is cancelled all the same.
            async with asyncio.timeout(self.timeout):
                response = await future
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

    def _work(self, connection: web_protocol.RequestHandler, request: Request) -> Optional[Response]:
        if connection.transport is None:  # aiohttp drops it when the client closes the connection
            self.dropped += 1
            return None
        return self.handler(request)

    def run(self, coroutine, timeout: float = 30.0):
        """Runs a coroutine on the server's event loop from another thread and returns its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        if self._ready.is_set() and self.loop.is_running():
            async def close():
                self.listener.close()
                await self.server.shutdown(1.0)  # answers in flight get a second, then are cut
                self.loop.stop()
            asyncio.run_coroutine_threadsafe(close(), self.loop)
            self._thread.join(10)
        self.workers.shutdown(wait=False, cancel_futures=True)
