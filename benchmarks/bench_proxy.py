"""`make bench-proxy`: what the proxy adds in front of the server, in one run.

The local server (on the latest pushed model) and the proxy (prediction log on) each run in their
own process, as in production. Measured, both directly against the server and through the proxy:

  1. one client, sequential single-row requests, alternating the paths: p50/p99 and the
     p50 the proxy adds (target: <= 0.5 ms). A third path is the floor under that target: a bare
     relay on the proxy's own HTTP server and backend client (serving/http.py, Backends), which
     forwards each request and does nothing else, so the p50 it adds is what the stack costs
     before any of the proxy's work (parsing, routing, metrics, the prediction log);
  2. 50 concurrent keep-alive clients for --seconds (default 60) each, in ROUNDS turns that
     alternate the two paths (so a burst of other work on a shared machine does not fall on one
     path alone): requests/s, p50/p99, errors (targets: 0 errors, through/direct requests/s >= 0.95);
then the prediction log is checked: every request the proxy answered is a row.
Writes build/bench_proxy.json.

    python -m benchmarks.bench_proxy [--model taxi] [--seconds 60] [--clients 50]
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from serving import loadgen

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARMUP = 20  # requests per path before the sequential measurement (connect, first calls)
ROUNDS = 6  # alternating turns per path of the concurrent measurement (10 s each at the default 60 s)
ROW = {"fare": 12.5, "trip_miles": 2.1, "trip_seconds": 600, "trip_start_hour": 19, "trip_start_day": 6,
       "trip_start_month": 5, "trip_start_timestamp": 1400269500, "payment_type": "Credit Card",
       "company": "Chicago Elite Cab Corp."}


def _start(args, work, name, env=None):
    port_file = os.path.join(work, f"{name}.port")
    log = open(os.path.join(work, f"{name}.log"), "w")
    process = subprocess.Popen([sys.executable, "-m", *args, "--port", "0", "--port_file", port_file], cwd=REPO,
                               stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 180
    while not os.path.exists(port_file):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start; see {log.name}")
        time.sleep(0.1)
    with open(port_file) as f:
        return process, int(f.read().split()[0])  # the server writes "rest_port grpc_port"


def relay(backend: str, port: int, port_file: str) -> None:
    """The floor: serving/http.py's server in front of the proxy's backend client, forwarding as is."""
    from serving.http import HttpServer, Response
    from serving.proxy import Backends

    backends = Backends()

    async def forward(request):
        status, data = await backends.call(backend, request.method, request.target, request.body or None, 30.0, 0,
                                           "the backend")
        return Response(status, data)

    stops = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)  # before the server's thread starts: it inherits the mask
    server = HttpServer(forward, "127.0.0.1", port, name="relay")
    server.start()
    with open(port_file + ".tmp", "w") as f:
        f.write(str(server.port))
    os.replace(port_file + ".tmp", port_file)
    signal.sigwait(stops)
    server.run(backends.close())
    server.stop()


def full_row(port, model):
    """ROW in the one wire form (every named input; NaN / "" for the rest), from the metadata."""
    import math
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models/{model}/metadata", timeout=30) as r:
        inputs = json.loads(r.read())["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]
    return {name: ROW.get(name, "" if info["dtype"] == "DT_STRING" else math.nan) for name, info in inputs.items()}


def run(model="taxi", model_base_path="build/model_repository", seconds=60.0, clients=50, sequential_n=500):
    work = tempfile.mkdtemp(prefix="bench-proxy-")
    log_path = os.path.join(work, "prediction_log.sqlite")
    # REST on an ephemeral port; --port 0 (added by _start) turns gRPC off, as in TF Serving.
    server, server_port = _start(["serving.server", "--model_name", model, "--model_base_path",
                                  os.path.join(model_base_path, model), "--rest_api_port", "0",
                                  "--file_system_poll_wait_seconds", "3600"], work, "server")
    proxy = bare = None
    try:
        proxy, proxy_port = _start(["serving.proxy", "--log", log_path], work, "proxy",
                                   {"PROXY_BACKEND": f"http://127.0.0.1:{server_port}"})
        bare, relay_port = _start(["benchmarks.bench_proxy", "--relay_for", f"http://127.0.0.1:{server_port}"],
                                  work, "relay")
        path, data = f"/v1/models/{model}:predict", json.dumps({"instances": [full_row(server_port, model)]}).encode()
        ports = {"direct": server_port, "proxy": proxy_port}
        single = loadgen.sequential({**ports, "relay": relay_port}, path, [data], sequential_n, warmup=WARMUP)
        failed = {name: r["errors"] for name, r in single.items() if r["errors"]}
        if failed:  # the prediction log check below counts every sequential request as answered
            raise RuntimeError(f"sequential requests failed: {failed}; see the logs in {work}")
        loaded = loadgen.alternating(ports, path, [data], clients, seconds, ROUNDS)
    finally:
        if bare is not None:
            bare.send_signal(signal.SIGTERM)
            bare.wait(timeout=60)
        if proxy is not None:
            proxy.send_signal(signal.SIGTERM)  # graceful: the log is written before it exits
            proxy.wait(timeout=120)
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    from serving import logstore

    with logstore.open_store(log_path, readonly=True) as store:
        logged = store.count()
    answered = loaded["proxy"]["requests"] - loaded["proxy"]["errors"] + WARMUP + sequential_n
    report = {
        "sequential": {**single, "p50_added_ms": single["proxy"]["p50_ms"] - single["direct"]["p50_ms"],
                       "relay_p50_added_ms": single["relay"]["p50_ms"] - single["direct"]["p50_ms"],
                       "p99_added_ms": single["proxy"]["p99_ms"] - single["direct"]["p99_ms"],
                       "p50_ratio": single["proxy"]["p50_ms"] / single["direct"]["p50_ms"]},
        "concurrent": {**loaded, "p50_ratio": loaded["proxy"]["p50_ms"] / loaded["direct"]["p50_ms"],
                       "p99_ratio": loaded["proxy"]["p99_ms"] / loaded["direct"]["p99_ms"],
                       "throughput_ratio": loaded["proxy"]["requests_per_second"]
                       / loaded["direct"]["requests_per_second"]},
        "prediction_log": {"answered": answered, "rows": logged},
    }
    report["targets"] = {
        "p50_added_ms<=0.5": report["sequential"]["p50_added_ms"] <= 0.5,
        "throughput_ratio>=0.95": report["concurrent"]["throughput_ratio"] >= 0.95,
        "errors==0": loaded["proxy"]["errors"] == 0 and loaded["direct"]["errors"] == 0,
        "every_answer_logged": logged == answered,
    }
    os.makedirs(os.path.join(REPO, "build"), exist_ok=True)
    with open(os.path.join(REPO, "build", "bench_proxy.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="taxi")
    parser.add_argument("--model_base_path", default="build/model_repository")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--relay_for", help=argparse.SUPPRESS)  # runs the bare relay to this backend instead
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port_file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.relay_for:
        relay(args.relay_for, args.port, args.port_file)
        return 0
    r = run(args.model, args.model_base_path, args.seconds, args.clients)
    s, c = r["sequential"], r["concurrent"]
    print("| path | one client p50 | p99 | "
          f"{args.clients} clients req/s | p50 | p99 | errors |\n|---|---|---|---|---|---|---|")
    for name in ("direct", "proxy"):
        print(f"| {name} | {s[name]['p50_ms']:.2f} ms | {s[name]['p99_ms']:.2f} ms | "
              f"{c[name]['requests_per_second']:.0f} | {c[name]['p50_ms']:.1f} ms | {c[name]['p99_ms']:.1f} ms | "
              f"{c[name]['errors']} |")
    print(f"| bare relay (the floor) | {s['relay']['p50_ms']:.2f} ms | {s['relay']['p99_ms']:.2f} ms | | | | |")
    print(f"a bare relay on the same HTTP server and client adds {s['relay_p50_added_ms']:.2f} ms at p50 with one "
          "client: the floor under the proxy's own work")
    print(f"proxy adds {s['p50_added_ms']:.2f} ms at p50 and {s['p99_added_ms']:.2f} ms at p99 with one client "
          f"(p50 ratio {s['p50_ratio']:.2f}); under {args.clients} clients p50 ratio {c['p50_ratio']:.2f}, "
          f"p99 ratio {c['p99_ratio']:.2f}, throughput ratio {c['throughput_ratio']:.2f}")
    for name, ok in r["targets"].items():
        print(f"target {name}: {'PASS' if ok else 'MISS'}")
    log = r["prediction_log"]
    print(f"prediction log: {log['rows']} rows for {log['answered']} answered requests")
    return 0 if c["proxy"]["errors"] == 0 and log["rows"] == log["answered"] else 1


if __name__ == "__main__":
    sys.exit(main())
