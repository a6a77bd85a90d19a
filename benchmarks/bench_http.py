"""An empty POST round trip on serving/http.py's HttpServer against bare aiohttp servers, measured in
the same run, interleaved (A B C A B C ...), one keep-alive http.client client, so the ratios hold
on a loaded machine where absolute times move.

    python -m benchmarks.bench_http [--rounds 7] [--requests 500] [--reference OLD_HTTP_PY]

`--reference` loads another serving/http.py (e.g. `git show <commit>:serving/http.py > /tmp/old_http.py`)
and measures its HttpServer beside this tree's: how a port of the server was judged. The bare
servers are aiohttp's low-level `web.Server` and a one-route `web.Application`: the floor under
any HttpServer built on them. Each HttpServer is measured twice: a plain handler (the local
server: answered on the event loop when alone, `inline_when_idle`) and a coroutine handler (the
proxy: run on the event loop)."""

import argparse
import asyncio
import http.client
import importlib.util
import os
import statistics
import threading
import time
from typing import Callable, Dict, List


def _load_http(path: str):
    spec = importlib.util.spec_from_file_location(f"http_under_test_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _http_servers(module, label: str) -> Dict[str, Callable[[], tuple]]:
    def plain(request):
        return module.Response(200, b"", None)

    async def coroutine(request):
        return module.Response(200, b"", None)

    def start(handler, **kwargs):
        def make():
            server = module.HttpServer(handler, **kwargs).start()
            return server.port, server.stop
        return make

    return {f"{label} plain handler, inline_when_idle": start(plain, inline_when_idle=True),
            f"{label} coroutine handler": start(coroutine)}


def _on_loop_thread(serve) -> tuple:
    """Runs `serve(loop) -> (port, cleanup coroutine)` on an event loop of its own thread."""
    loop, ready, box = asyncio.new_event_loop(), threading.Event(), {}

    def run():
        asyncio.set_event_loop(loop)
        box["port"], box["cleanup"] = loop.run_until_complete(serve())
        ready.set()
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    ready.wait(30)

    def stop():
        asyncio.run_coroutine_threadsafe(box["cleanup"](), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
    return box["port"], stop


def _bare_aiohttp() -> Dict[str, Callable[[], tuple]]:
    from aiohttp import web

    async def answer(request):
        await request.read()
        return web.Response(status=200, body=b"")

    async def low_level():
        server = web.Server(answer, access_log=None)
        listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)

        async def cleanup():
            listener.close()
            await server.shutdown(1)
        return listener.sockets[0].getsockname()[1], cleanup

    async def application():
        app = web.Application()
        app.router.add_post("/{tail:.*}", answer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return site._server.sockets[0].getsockname()[1], runner.cleanup

    return {"aiohttp web.Server (bare)": lambda: _on_loop_thread(low_level),
            "aiohttp web.Application (bare)": lambda: _on_loop_thread(application)}


def _round_trips(port: int, count: int) -> List[float]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    times = []
    for i in range(count + 20):
        begin = time.perf_counter()
        connection.request("POST", "/v1/models/m:predict", body=b"", headers={"Content-Length": "0"})
        response = connection.getresponse()
        response.read()
        elapsed = time.perf_counter() - begin
        if response.status != 200:
            raise RuntimeError(f"answered {response.status}")
        if i >= 20:  # the first ones warm the connection and the pools
            times.append(elapsed * 1000)
    connection.close()
    return times


def _p(values: List[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main(argv=None) -> Dict[str, Dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=500, help="round trips per server per round")
    parser.add_argument("--reference", help="another serving/http.py whose HttpServer is measured beside this one")
    args = parser.parse_args(argv)

    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "serving", "http.py")
    servers = _http_servers(_load_http(here), "serving/http.py")
    if args.reference:
        servers.update(_http_servers(_load_http(args.reference), f"reference {os.path.basename(args.reference)}"))
    servers.update(_bare_aiohttp())
    started = {name: make() for name, make in servers.items()}
    times: Dict[str, List[float]] = {name: [] for name in servers}
    load = [os.getloadavg()[0]]
    try:
        for _ in range(args.rounds):
            for name, (port, _stop) in started.items():
                times[name] += _round_trips(port, args.requests)
            load.append(os.getloadavg()[0])
    finally:
        for port, stop in started.values():
            stop()

    first = next(iter(times))
    figures = {name: {"p50_ms": statistics.median(t), "p99_ms": _p(t, 99)} for name, t in times.items()}
    print(f"empty POST round trip, one keep-alive client, {args.rounds} interleaved rounds x {args.requests}; "
          f"1-min load average {min(load):.2f}-{max(load):.2f}")
    for name, f in figures.items():
        f["p50_ratio_to_first"] = f["p50_ms"] / figures[first]["p50_ms"]
        print(f"  {name:58s} p50 {f['p50_ms']:.3f} ms  p99 {f['p99_ms']:.3f} ms  "
              f"p50 x{f['p50_ratio_to_first']:.2f} of the first")
    return figures


if __name__ == "__main__":
    main()
