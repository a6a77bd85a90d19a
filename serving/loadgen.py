"""The one load generator for the REST API: sequential requests on one keep-alive connection per
server, and concurrent keep-alive clients for a while.

The sandbox component's latency and throughput checks (components/sandbox.py) and `make
bench-proxy` / `make bench-serving` measure with it, so their figures mean the same thing:
`requests` sent, `errors` (a status other than 200, or a broken connection, after which the
client reconnects), p50/p99 in ms over every request sent, and for concurrent clients
`requests_per_second` answered with 200, and `client_cpu_ms_per_request`, the CPU the sending
process spent per request (the clients share the machine with the server they measure).

It needs the standard library and numpy only (no TensorFlow): it is a client, and runs wherever one does.
"""

import http.client
import os
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

HOST = "127.0.0.1"
TIMEOUT_SECONDS = 60.0


def connect(port: int, host: str = HOST, timeout: float = TIMEOUT_SECONDS) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(host, port, timeout=timeout)


def post(conn: http.client.HTTPConnection, path: str, body: bytes) -> Tuple[int, bytes]:
    """(status, body) of one JSON POST on a keep-alive connection."""
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, response.read()


def cpu_seconds(pid: Optional[int] = None) -> float:
    """CPU time (user + system, all threads) a process has used so far: this one, or another
    by its pid (Linux /proc/<pid>/stat fields 14 and 15)."""
    if pid is None:
        return time.process_time()
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentiles(seconds: Sequence[float]) -> Dict[str, Optional[float]]:
    """p50 and p99 in ms (numpy's linear interpolation); None without a request."""
    if not len(seconds):
        return {"p50_ms": None, "p99_ms": None}
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


class _Client:
    """One keep-alive connection that counts its errors and reconnects after a broken one."""

    def __init__(self, port: int, host: str):
        self.port, self.host = port, host
        self.conn = connect(port, host)
        self.seconds: List[float] = []
        self.errors = 0

    def send(self, path: str, body: bytes) -> None:
        started = time.perf_counter()
        try:
            status, _ = post(self.conn, path, body)
        except (OSError, http.client.HTTPException):
            status = None
            self.conn.close()
            self.conn = connect(self.port, self.host)
        self.seconds.append(time.perf_counter() - started)
        self.errors += status != 200

    def close(self) -> None:
        self.conn.close()


def sequential(ports: Dict[str, int], path: str, bodies: Sequence[bytes], requests: int, warmup: int = 0,
               host: str = HOST) -> Dict[str, Dict[str, float]]:
    """`requests` rounds, one request (bodies in turn) to each named server per round, so servers
    compared side by side see the same moment; `warmup` rounds first, not counted. Per name:
    requests, errors, p50_ms, p99_ms."""
    clients = {name: _Client(port, host) for name, port in ports.items()}
    try:
        for i in range(warmup + requests):
            if i == warmup:
                for client in clients.values():
                    client.seconds, client.errors = [], 0
            for client in clients.values():
                client.send(path, bodies[i % len(bodies)])
    finally:
        for client in clients.values():
            client.close()
    return {name: {"requests": len(c.seconds), "errors": c.errors, **percentiles(c.seconds)}
            for name, c in clients.items()}


def concurrent(port: int, path: str, bodies: Sequence[bytes], clients: int, seconds: float,
               host: str = HOST) -> Dict[str, float]:
    """`clients` threads, each on its own keep-alive connection, sending for `seconds` (client k
    sends bodies k, k + clients, ...): clients, seconds, requests, errors, requests_per_second
    (answered with 200), p50_ms, p99_ms, client_cpu_ms_per_request."""
    return _summary(clients, [_load(port, path, bodies, clients, seconds, host)])


def alternating(ports: Dict[str, int], path: str, bodies: Sequence[bytes], clients: Union[int, Dict[str, int]],
                seconds: float, rounds: int, host: str = HOST) -> Dict[str, Dict[str, float]]:
    """concurrent() against each named server for `seconds` in all, in `rounds` turns taken in
    order (a, b, a, b, ...), so servers compared on a shared machine see the same stretch of time
    rather than one of them a quiet minute and the other a busy one. `clients`: one count for
    all, or one per name (a load compared with its one-client reference). Per name, as concurrent()."""
    counts = clients if isinstance(clients, dict) else {name: clients for name in ports}
    runs: Dict[str, list] = {name: [] for name in ports}
    for _ in range(rounds):
        for name, port in ports.items():
            runs[name].append(_load(port, path, bodies, counts[name], seconds / rounds, host))
    return {name: _summary(counts[name], r) for name, r in runs.items()}


def _load(port: int, path: str, bodies: Sequence[bytes], clients: int, seconds: float,
          host: str) -> Tuple[List[float], int, float, float]:
    """(seconds of every request sent, errors, elapsed seconds, CPU seconds of this process)."""
    stop_at = time.perf_counter() + seconds
    senders = [_Client(port, host) for _ in range(clients)]

    def run(k: int) -> None:
        i = k
        try:
            while time.perf_counter() < stop_at:
                senders[k].send(path, bodies[i % len(bodies)])
                i += clients
        finally:
            senders[k].close()

    started, cpu = time.perf_counter(), cpu_seconds()
    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ([s for sender in senders for s in sender.seconds], sum(sender.errors for sender in senders),
            time.perf_counter() - started, cpu_seconds() - cpu)


def _summary(clients: int, runs: Sequence[Tuple[List[float], int, float, float]]) -> Dict[str, float]:
    sent = [s for run in runs for s in run[0]]
    errors, elapsed, cpu = (sum(run[i] for run in runs) for i in (1, 2, 3))
    return {"clients": clients, "seconds": elapsed, "requests": len(sent), "errors": errors,
            "requests_per_second": (len(sent) - errors) / elapsed, **percentiles(sent),
            "client_cpu_ms_per_request": cpu / max(len(sent), 1) * 1e3}
