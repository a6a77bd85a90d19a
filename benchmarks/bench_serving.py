"""`make bench-serving`: the local TF Serving twin against the in-process signature call (the
floor), REST and gRPC, single row and a batch of 100 (the three calls in turn); then 1, 8 and 50
concurrent single-row clients with server-side batching off and on, the two servers' loads
taken in alternating turns; then the batching target's two sides (one sequential client of the
unbatched server, 50 of the batched one), alternating too. One run, ratios against references
measured in it, each beside the load it was measured under.

    python -m benchmarks.bench_serving [--model_repository build/model_repository] [--model taxi]

The servers run in their own processes (`python -m serving.server`, as `make serve` starts them),
so the clients' Python does not share the server's interpreter. Targets (issue 9): single-row
REST p50 <= 1.5x in-process, gRPC p50 <= 1.3x in-process; with batching, 50 concurrent
single-row clients >= 4x the requests/s of one sequential client, with p99 <= 50 ms.
Each concurrent run also reports the CPU per request of the server process and of the clients
(both share this machine's cores), and what those costs allow at most on all cores
(`cpu_bound_requests_per_s`), so a miss can be told apart from a ceiling. Writes build/bench_serving.json.
"""

import argparse
import http.client
import json
import math
import os
import subprocess
import sys
import tempfile
import time

from serving import loadgen

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW = {"fare": 12.5, "trip_miles": 2.1, "trip_seconds": 600.0, "trip_start_hour": 19.0, "trip_start_day": 6.0,
       "trip_start_month": 5.0, "trip_start_timestamp": 1400269500.0, "payment_type": "Credit Card",
       "company": "Chicago Elite Cab Corp."}


def full_row(specs):
    """The one wire form: every named input, NaN / "" for the gaps (serving/json_tensor.py)."""
    return {name: ROW.get(name, "" if spec.dtype.name == "string" else math.nan) for name, spec in specs.items()}


def timed(calls, n):
    """{name: p50/p99/n} of `n` rounds that make each call in turn (after one round not counted):
    on a shared machine the floor and the paths compared with it see the same moments, so a burst
    of other work cannot land on one of them alone and flip a ratio."""
    times = {name: [] for name in calls}
    for round_ in range(n + 1):
        for name, call in calls.items():
            t = time.perf_counter()
            call()
            if round_:
                times[name].append(time.perf_counter() - t)
    return {name: {**loadgen.percentiles(t), "n": len(t)} for name, t in times.items()}


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: the other work on a shared machine, said beside the
    ratios measured under it."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def free_port() -> int:
    """A port for gRPC (TF Serving's --port 0 turns gRPC off rather than picking one)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model: str, base_path: str, batching: bool, extra=(), batching_file: str = ""):
        self.work = tempfile.mkdtemp(prefix="bench_serving_")
        port_file = os.path.join(self.work, "ports")
        args = [sys.executable, "-m", "serving.server", "--model_name", model, "--model_base_path", base_path,
                "--rest_api_port", "0", "--port", str(free_port()), "--port_file", port_file,
                "--file_system_poll_wait_seconds", "3600"]
        args += list(extra)
        if batching:
            args += ["--enable_batching", "--batching_parameters_file",
                     batching_file or os.path.join(REPO, "serving", "config", "batching.config")]
        self.log = open(os.path.join(self.work, "server.log"), "w")
        self.process = subprocess.Popen(args, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while not os.path.exists(port_file):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start; see {self.log.name}")
            time.sleep(0.2)
        with open(port_file) as f:
            self.rest_port, self.grpc_port = (int(p) for p in f.read().split())

    def stop(self):
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


ROUNDS = 4  # turns per load in an interleaved comparison


def under_load(runs, path: str, body: bytes, seconds: float):
    """{name: (server, clients)} -> loadgen.alternating over them (each load `seconds` in all, in
    ROUNDS turns taken in order, so a load and its reference share the same stretch of a shared
    machine), with each server's CPU per request and the requests/s that the server's and the
    clients' CPU per request allow on every core. The servers must differ: a server's CPU is read
    over the whole comparison (the other's turns leave it idle)."""
    before = {name: loadgen.cpu_seconds(server.process.pid) for name, (server, _) in runs.items()}
    results = loadgen.alternating({name: server.rest_port for name, (server, _) in runs.items()}, path, [body],
                                  {name: clients for name, (_, clients) in runs.items()}, seconds, ROUNDS)
    for name, result in results.items():
        server = runs[name][0]
        result["server_cpu_ms_per_request"] = (loadgen.cpu_seconds(server.process.pid) - before[name]) / max(
            result["requests"], 1) * 1e3
        per_request = result["server_cpu_ms_per_request"] + result["client_cpu_ms_per_request"]
        result["cpu_bound_requests_per_s"] = (os.cpu_count() or 1) * 1e3 / per_request if per_request else None
    return results


def rest_caller(port: int, path: str, body: bytes):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def call():
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")
    return call


def grpc_caller(port: int, model: str, specs, rows):
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    for name, spec in specs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto([r[name] for r in rows], dtype=spec.dtype))
    return lambda: stub.Predict(request, timeout=30)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_repository", default="build/model_repository")
    parser.add_argument("--model", default="taxi")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--batching_parameters_file", default="",
                        help="BatchingParameters for the batched server (default: serving/config/batching.config)")
    parser.add_argument("--server_flag", action="append", default=[],
                        help="a flag for both servers, e.g. --server_flag=--tensorflow_inter_op_parallelism=1")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tensorflow as tf

    from tensorflow.python.eager.polymorphic_function.concrete_function import ConcreteFunction

    from serving import model_config, repository

    base = os.path.join(args.model_repository, args.model)
    versions = model_config.versions_on_disk(base)
    if not versions:
        raise SystemExit(f"no pushed version under {base}: run `make run` first")
    signature = tf.saved_model.load(os.path.join(base, str(versions[-1]))).signatures["serving_default"]
    specs = signature.structured_input_signature[1]
    flat = repository.flat_call_parts(signature)
    if flat is None:
        raise SystemExit("the signature takes no flat call (serving/repository.py flat_call_parts says when)")
    row = full_row(specs)
    path = f"/v1/models/{args.model}:predict"
    results = {"model": args.model, "version": versions[-1], "load_average_at_start": load_average()}

    plain = ServerProcess(args.model, base, batching=False, extra=args.server_flag)
    # A batched predict call waits for its batch on the server's event loop, not in a worker.
    batched = ServerProcess(args.model, base, batching=True, extra=args.server_flag,
                            batching_file=args.batching_parameters_file)
    try:
        for label, rows in (("single_row", [row]), ("batch_100", [row] * 100)):
            tensors = {k: tf.constant([r[k] for r in rows], s.dtype) for k, s in specs.items()}
            # Two floors: the public keyword call (the issue's "in-process call", the targets' reference)
            # and the flat call with captures read once, which the server itself makes
            # (serving/repository.py flat_call): the wire's own cost is the distance from the second.
            order, captures = flat
            flat_args = [tensors[k] for k in order]
            measured = timed({"in_process": lambda: signature(**tensors),
                              "in_process_flat": lambda: ConcreteFunction._call_flat(signature, flat_args, captures),
                              "rest": rest_caller(plain.rest_port, path, json.dumps({"instances": rows}).encode()),
                              "grpc": grpc_caller(plain.grpc_port, args.model, specs, rows)}, args.requests)
            floor, rest, grpc_ = measured["in_process"], measured["rest"], measured["grpc"]
            flat_floor = measured["in_process_flat"]
            results[label] = {"in_process": floor, "in_process_flat": flat_floor, "rest": rest, "grpc": grpc_,
                              "rest_p50_ratio": rest["p50_ms"] / floor["p50_ms"],
                              "grpc_p50_ratio": grpc_["p50_ms"] / floor["p50_ms"],
                              "rest_p50_ratio_to_flat_call": rest["p50_ms"] / flat_floor["p50_ms"],
                              "grpc_p50_ratio_to_flat_call": grpc_["p50_ms"] / flat_floor["p50_ms"]}
        body = json.dumps({"instances": [row]}).encode()
        loads = [under_load({"unbatched": (plain, c), "batched": (batched, c)}, path, body, args.seconds)
                 for c in (1, 8, 50)]
        results["unbatched"], results["batched"] = ([load[mode] for load in loads] for mode in ("unbatched", "batched"))
        # The batching target's two sides, interleaved with each other: one sequential client of
        # the unbatched server, and 50 clients of the batched one.
        results["batching_target"] = under_load({"sequential": (plain, 1), "batched_50": (batched, 50)}, path, body,
                                                args.seconds)
    finally:
        plain.stop()
        batched.stop()

    results["load_average_at_end"] = load_average()
    print(f"load average (1, 5, 15 min): {results['load_average_at_start']} at the start, "
          f"{results['load_average_at_end']} at the end, on {os.cpu_count()} cores")
    for label in ("single_row", "batch_100"):
        r = results[label]
        print(f"{label:>10}: in-process p50 {r['in_process']['p50_ms']:.2f} ms | REST p50 {r['rest']['p50_ms']:.2f} ms "
              f"({r['rest_p50_ratio']:.2f}x) | gRPC p50 {r['grpc']['p50_ms']:.2f} ms ({r['grpc_p50_ratio']:.2f}x) | "
              f"flat call p50 {r['in_process_flat']['p50_ms']:.2f} ms: REST {r['rest_p50_ratio_to_flat_call']:.2f}x, "
              f"gRPC {r['grpc_p50_ratio_to_flat_call']:.2f}x")
    for mode in ("unbatched", "batched"):
        for c in results[mode]:
            print(f"{mode:>10}, {c['clients']:>2} clients: {c['requests_per_second']:7.0f} req/s, "
                  f"p50 {c['p50_ms']:.2f} ms, p99 {c['p99_ms']:.2f} ms, errors {c['errors']} | CPU per request: "
                  f"server {c['server_cpu_ms_per_request']:.2f} ms, clients {c['client_cpu_ms_per_request']:.2f} ms "
                  f"(at most {c['cpu_bound_requests_per_s']:.0f} req/s on {os.cpu_count()} cores)")
    sequential = results["batching_target"]["sequential"]["requests_per_second"]
    fifty = results["batching_target"]["batched_50"]
    results["targets"] = {
        "rest_single_row_p50_ratio<=1.5": results["single_row"]["rest_p50_ratio"] <= 1.5,
        "grpc_single_row_p50_ratio<=1.3": results["single_row"]["grpc_p50_ratio"] <= 1.3,
        "batched_50_clients_throughput_ratio>=4": fifty["requests_per_second"] / sequential >= 4,
        "batched_50_clients_p99<=50ms": fifty["p99_ms"] <= 50,
    }
    results["batched_50_vs_sequential_throughput_ratio"] = fifty["requests_per_second"] / sequential
    results["batched_50_cpu_bound_vs_sequential_ratio"] = fifty["cpu_bound_requests_per_s"] / sequential
    print(f"50 batched clients vs one sequential client, interleaved: {fifty['requests_per_second']:.0f} vs "
          f"{sequential:.0f} req/s, {results['batched_50_vs_sequential_throughput_ratio']:.2f}x (their CPU per request "
          f"allows at most {results['batched_50_cpu_bound_vs_sequential_ratio']:.2f}x); batched p99 {fifty['p99_ms']:.1f} ms")
    for name, ok in results["targets"].items():
        print(f"target {name}: {'PASS' if ok else 'MISS'}")
    os.makedirs("build", exist_ok=True)
    with open("build/bench_serving.json", "w") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
