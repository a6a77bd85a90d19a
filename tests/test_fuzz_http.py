"""Property-based fuzzing at the layer an attacker reaches: raw HTTP/1.1 bytes on a socket
(request line, headers, framing, encodings, lengths, bodies), against the local server and the
proxy in front of it. Properties, for every case: no 5xx, the process keeps serving, and every
request whose framing is complete is answered (or refused with a close) within the timeout.

5,000 cases per target; the counts by outcome are printed (pytest -s) and asserted.
"""

import collections
import gzip
import json
import math
import shutil
import socket
import time

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import serve

CASES = 5000
TIMEOUT = 10.0  # seconds a complete request may take to be answered
# RFC 9110 5.6.2 token (a header name, a method); 5.5 field value: visible ASCII, space, tab.
TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
FIELD_VALUE = re.compile(r"[\x20-\x7e\t]*")
ORIGIN_FORM = re.compile(r"/[\x21-\x7e]*")  # RFC 9112 3.2.1, visible ASCII
METHODS_WITH_ORIGIN_FORM = {"GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE"}  # CONNECT: authority

METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE", "CONNECT", "get",
                           "POST ", "P\x00ST", "\u00e9", ""])
SEGMENTS = st.sampled_from(["v1", "V1", "models", "MODELS", "taxi", "t%61xi", "%ff", "%", "versions", "labels", "1",
                            "99999999999999999999", "-1", "stable", "gold", "metadata", ":predict", ":classify",
                            ":regress", ":PREDICT", "taxi:predict", "..", "", "\u00e9", "\ud7ff", "a b", "?x=1", "#f",
                            "monitoring", "prometheus", "metrics"])
PATHS = st.one_of(
    st.lists(SEGMENTS, max_size=6).map(lambda parts: "/" + "/".join(parts)),
    st.sampled_from(["/v1/models/taxi:predict", "/v1/models/taxi/labels/stable:predict", "/v1/models/taxi:classify",
                     "/v1/models/taxi/metadata", "/v1/models/taxi", "*", "http://x/v1/models/taxi:predict"]),
    st.text(max_size=40).map(lambda t: "/" + t))


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(), st.text(max_size=8),
                    st.sampled_from(["Cash", "", "NaN"]))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                    max_leaves=6)


@st.composite
def bodies(draw, features):
    """features: {name: 'string' | 'number'} of serving_default's inputs."""
    kind = draw(st.sampled_from(["empty", "bytes", "json", "valid", "valid", "row", "inputs", "examples", "deep"]))
    names = sorted(features)
    if kind == "empty":
        return b""
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "deep":
        depth = draw(st.integers(1, 3000))
        return b'{"instances": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "json":
        return json.dumps(draw(JSON)).encode()
    if kind == "examples":
        return json.dumps({"signature_name": draw(st.sampled_from(["classification", "", "x"])),
                           "examples": draw(st.lists(st.dictionaries(st.sampled_from(names), SCALARS, max_size=4),
                                                     max_size=3))}).encode()
    if kind == "valid":  # every named input with a value of its type (a gap as NaN / "")
        row = {n: draw(st.sampled_from(["Cash", "", "Credit Card"])) if t == "string" else
               draw(st.one_of(st.floats(-1e6, 1e6), st.just(math.nan), st.integers(0, 100))) for n, t in features.items()}
        return json.dumps({"instances": [row] * draw(st.integers(1, 3))}).encode()
    row = draw(st.dictionaries(st.sampled_from(names), SCALARS, max_size=len(names)))
    body = {"instances": [row]} if kind == "row" else {"inputs": {k: [v] for k, v in row.items()}}
    return json.dumps(body).encode()


@st.composite
def requests(draw, feature_names):
    # A quarter are well-formed predict envelopes, so bodies reach the model, not only the parser.
    wellformed = draw(st.integers(0, 3)) == 0
    method = "POST" if wellformed else draw(METHODS)
    path = draw(st.sampled_from(["/v1/models/taxi:predict", "/v1/models/taxi/labels/stable:predict"])) \
        if wellformed else draw(PATHS)
    version = "HTTP/1.1" if wellformed else draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 x", ""]))
    body = draw(bodies(feature_names))
    framing = draw(st.sampled_from(["length", "chunked"] if wellformed else [
        "length", "length", "chunked", "gzip", "none", "negative", "both", "bad_length", "two_lengths", "te_other"]))
    headers = [("Host", "x")]
    complete = True
    # Well-framed: a valid request line, valid headers, a body its framing delimits exactly. Such a
    # request must be answered; only malformed framing may be met with a close.
    well_framed = (method in METHODS_WITH_ORIGIN_FORM and bool(ORIGIN_FORM.fullmatch(path))
                   and version in ("HTTP/1.1", "HTTP/1.0")
                   and (framing in ("length", "gzip") or (framing == "chunked" and version == "HTTP/1.1")
                        or (framing == "none" and not body)))
    if framing == "gzip":
        body = gzip.compress(body) if draw(st.booleans()) else body  # sometimes a lie
        headers += [("Content-Encoding", "gzip"), ("Content-Length", str(len(body)))]
    elif framing == "length":
        headers.append(("Content-Length", str(len(body))))
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        body = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 37]), body[i:i + 37]) for i in range(0, len(body), 37)) \
            + b"0\r\n\r\n"
    elif framing == "negative":
        headers.append(("Content-Length", "-1"))
    elif framing == "both":
        headers += [("Transfer-Encoding", "chunked"), ("Content-Length", str(len(body)))]
    elif framing == "bad_length":
        headers.append(("Content-Length", draw(st.sampled_from(["abc", "1e3", "0x10", " ", "99999999999999999999"]))))
    elif framing == "two_lengths":
        headers += [("Content-Length", str(len(body))), ("Content-Length", str(len(body) + 1))]
    elif framing == "te_other":
        headers.append(("Transfer-Encoding", draw(st.sampled_from(["gzip", "chunked, gzip", "identity", "x"]))))
    else:
        complete = not body
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["X-User-Id", "X-Request-Id", "Content-Type", "Expect", "Connection", "Origin",
                                     "X\x00", "Bad Name", ""]))
        value = draw(st.text(max_size=20))
        well_framed = well_framed and bool(TOKEN.fullmatch(name)) and bool(FIELD_VALUE.fullmatch(value))
        headers.append((name, value))
    head = f"{method} {path} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode("utf-8", "surrogatepass") + body, complete, well_framed


def send(port, data: bytes, complete: bool) -> str:
    """The status class of the answer ('2xx', '4xx', '5xx'), 'closed' (no answer, connection
    closed), or 'hang' (nothing within the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        try:
            sock.sendall(data)
            if not complete:
                sock.shutdown(socket.SHUT_WR)  # nothing more comes: an incomplete request ends here
        except OSError:
            pass  # the server closed first (e.g. refused the headers)
        answer = b""
        started = time.monotonic()
        try:
            while b"\r\n" not in answer:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        except socket.timeout:
            return "hang"
        except ConnectionResetError:
            return "closed"
        if time.monotonic() - started > TIMEOUT:
            return "hang"
    if not answer:
        return "closed"
    parts = answer.split(b" ", 2)
    if len(parts) < 2 or not parts[1][:3].isdigit():
        return "garbled"
    return f"{parts[1][:1].decode()}xx"


def alive(url: str, row) -> bool:
    import urllib.request

    request = urllib.request.Request(url + "/v1/models/taxi:predict", method="POST",
                                     data=json.dumps({"instances": [row]}).encode())
    with urllib.request.urlopen(request, timeout=30) as r:
        return r.status == 200


@pytest.fixture(scope="module")
def targets(small_model, tmp_path_factory):
    from tests.test_proxy import start_proxy

    root = tmp_path_factory.mktemp("fuzz_repo")
    shutil.copytree(small_model[0], root / "taxi" / "1")
    server = serve(root, {"taxi": {"stable": 1}})
    log = tmp_path_factory.mktemp("fuzz_log") / "log.sqlite"
    # Client routing allowed, so the generator's /labels/ and /versions/ URLs reach the model too.
    _, proxy_url, stop = start_proxy({"PROXY_BACKEND": server.url, "PROXY_ALLOW_CLIENT_ROUTING": "true"},
                                     log_path=str(log))
    specs = server.servables.repository.resolve("taxi").signatures["serving_default"].structured_input_signature[1]
    features = {n: "string" if s.dtype.name == "string" else "number" for n, s in specs.items()}
    yield {"server": server.url, "proxy": proxy_url, "features": features}
    stop()
    server.stop()


@pytest.mark.parametrize("target", ["server", "proxy"])
def test_raw_http_fuzz_never_gets_a_5xx_a_crash_or_a_hang(targets, target, taxi_spec):
    url = targets[target]
    port = int(url.rsplit(":", 1)[1])
    counts = collections.Counter()
    framed = {True: collections.Counter(), False: collections.Counter()}
    failures = []

    @settings(max_examples=CASES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(requests(targets["features"]))
    def check(case):
        data, complete, well_framed = case
        outcome = send(port, data, complete)
        counts[outcome] += 1
        framed[well_framed][outcome] += 1
        if outcome in ("5xx", "garbled", "hang") or (outcome == "closed" and well_framed):
            failures.append((outcome, data[:300]))

    check()
    print(f"\n{target}: {sum(counts.values())} raw requests: {dict(sorted(counts.items()))}; well-framed: "
          f"{dict(sorted(framed[True].items()))}, malformed: {dict(sorted(framed[False].items()))}")
    row = {n: ("Cash" if t == "string" else math.nan) for n, t in targets["features"].items()}
    assert alive(url, row), "stopped serving"
    assert sum(counts.values()) == CASES
    assert failures == [], failures[:5]
    assert counts["2xx"] >= CASES // 50, counts  # the generator reaches the model, not only the parser
    assert sum(framed[True].values()) >= CASES // 10, framed  # the well-framed rule is really exercised
