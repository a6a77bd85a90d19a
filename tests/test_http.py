"""serving/http.py on its own, with a trivial handler: the framing rules and timeouts it adds to or
tightens in aiohttp's server (each one tornado, which it replaced, also held), answered in JSON
that names the fault, with the connection closed. The same rules through the whole local server
and the proxy are in tests/test_serving_conformance.py, tests/test_server.py and tests/test_fuzz_http.py."""

import gzip
import json
import socket
import time

import pytest

from serving.http import HttpServer, Response

LIMIT = 1000  # the body limit of the server under test, small so the tests send little


@pytest.fixture(scope="module")
def server():
    calls = []

    def handler(request):
        calls.append((request.method, request.target, request.body))
        headers = {"Connection": "close"} if request.target == "/close" else None  # as the proxy when draining
        return Response(200, json.dumps({"bytes": len(request.body)}).encode(), headers=headers)

    http = HttpServer(handler, idle_timeout=0.6, body_timeout=0.4, max_body_bytes=LIMIT, inline_when_idle=True).start()
    http.calls = calls
    yield http
    http.stop()


def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection (b'...<open>' if it does not)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except socket.timeout:
            return out + b"<open>"
        except ConnectionResetError:
            pass
        return out


def parts(answer: bytes):
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), body


HEAD = "POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\n"


@pytest.mark.parametrize("request_bytes, code, named", [
    # RFC 9112 6.1: both framings may smuggle a second request; refused, the connection closed.
    (HEAD + "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", 400, "Content-Length"),
    # RFC 9112 6.1: chunked must be the final coding and no other is served; aiohttp's parser takes
    # 'gzip, chunked', serving/http.py refuses it (as tornado did).
    (HEAD + "Transfer-Encoding: gzip, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 400, "Transfer-Encoding"),
    (HEAD + "Transfer-Encoding: chunked, gzip\r\n\r\n{}", 400, "Transfer-Encoding"),
    # RFC 9112 6.3 (5): an invalid or repeated Content-Length is unrecoverable.
    (HEAD + "Content-Length: -1\r\n\r\n{}", 400, "Content-Length"),
    (HEAD + "Content-Length: abc\r\n\r\n{}", 400, "Content-Length"),
    (HEAD + "Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400, "Content-Length"),
    # The limit is checked on the declared length before the body is read.
    (HEAD + f"Content-Length: {LIMIT + 1}\r\n\r\n{{}}", 413, f"{LIMIT}-byte body limit"),
    (HEAD + "Transfer-Encoding: chunked\r\n\r\n" + f"{LIMIT + 1:x}\r\n" + "a" * (LIMIT + 1) + "\r\n0\r\n\r\n", 413,
     f"{LIMIT}-byte body limit"),
    # RFC 9112 2.3, 3: only HTTP/1.x; llhttp would take HTTP/2.0 and 0.9 request lines.
    ("GET /v1/models/m HTTP/2.0\r\nHost: x\r\n\r\n", 400, "HTTP version 2.0"),
    ("GARBAGE\r\n\r\n", 400, "malformed HTTP/1.1 request"),
    # RFC 3986 2: a target is ASCII; a raw UTF-8 byte gets an answer, never a dropped connection.
    ("GET /v1/models/\u00e9 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "url"),
])
def test_refused_framing_is_answered_in_json_naming_it_and_the_connection_closes(server, request_bytes, code, named):
    before = len(server.calls)
    status, body = parts(exchange(server.port, request_bytes.encode()))
    assert status.startswith(f"HTTP/1.1 {code}"), status
    assert named in json.loads(body)["error"]
    assert len(server.calls) == before  # the handler never saw it


def test_chunked_and_gzip_bodies_reach_the_handler_whole(server):
    body = json.dumps({"instances": list(range(100))}).encode()
    chunked = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(body[i:i + 37]), body[i:i + 37]) for i in range(0, len(body), 37))
    close = "Connection: close\r\n"
    answer = exchange(server.port, (HEAD + close + "Transfer-Encoding: chunked\r\n\r\n").encode() + chunked + b"0\r\n\r\n")
    assert parts(answer)[0] == "HTTP/1.1 200 OK" and server.calls[-1][2] == body
    packed = gzip.compress(body)
    answer = exchange(server.port, (HEAD + close + f"Content-Encoding: gzip\r\nContent-Length: {len(packed)}\r\n\r\n")
                      .encode() + packed)
    assert parts(answer)[0] == "HTTP/1.1 200 OK" and server.calls[-1][2] == body  # evhttp_request.cc:261-269
    bomb = gzip.compress(b" " * (LIMIT + 1))  # small on the wire, over the limit once decompressed
    answer = exchange(server.port, (HEAD + close + f"Content-Encoding: gzip\r\nContent-Length: {len(bomb)}\r\n\r\n")
                      .encode() + bomb)
    status, error = parts(answer)
    assert status.startswith("HTTP/1.1 400") and f"over {LIMIT} bytes once decompressed" in json.loads(error)["error"]


def test_a_keep_alive_connection_is_reused_then_closed_when_idle(server):
    request = (HEAD + "Content-Length: 2\r\n\r\n{}").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(0.3)  # under the 0.6 s idle timeout: the same connection answers again
        sock.sendall(request)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert sock.recv(1) == b""  # then the server closes it
        assert 0.3 < time.monotonic() - started < 3


def test_a_handler_that_answers_connection_close_gets_the_connection_closed(server):
    # keep-alive asked, close answered: closed at once, not at the 0.6 s idle timeout
    answer = exchange(server.port, b"GET /close HTTP/1.1\r\nHost: x\r\n\r\n", timeout=0.3)
    assert answer.startswith(b"HTTP/1.1 200") and not answer.endswith(b"<open>")


def test_a_body_that_stalls_is_answered_408_and_never_handled(server):
    before = len(server.calls)
    started = time.monotonic()
    status, body = parts(exchange(server.port, (HEAD + "Content-Length: 10\r\n\r\n{}").encode()))
    assert status.startswith("HTTP/1.1 408") and "0.4 s" in json.loads(body)["error"]
    assert time.monotonic() - started < 3 and len(server.calls) == before


def test_100_continue_is_sent_only_for_a_body_within_the_limit(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall((HEAD + "Expect: 100-continue\r\nContent-Length: 2\r\n\r\n").encode())
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"  # RFC 9110 10.1.1
        sock.sendall(b"{}")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    answer = exchange(server.port, (HEAD + f"Expect: 100-continue\r\nContent-Length: {LIMIT + 1}\r\n\r\n").encode())
    assert answer.startswith(b"HTTP/1.1 413") and b"100 Continue" not in answer
