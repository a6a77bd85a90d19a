"""`make bench-scale`: the taxi pipeline at 1x, 10x and 50x its rows, time per component and peak memory.

The larger datasets are the taxi CSV resampled with noise (written row by row, never held in
memory): each copy of a row jitters amounts and durations by a few percent and shifts the
timestamp, keeps categories and missing cells as they are. Each size runs the unchanged
pipeline (`python -m pipelines.local_runner`) in a fresh child process with its own pipeline
root and metadata, while this process samples the resident memory of the child and all its
descendants (Beam workers included) every 0.2 s. Reported per size: rows, wall time per
component, total, seconds per 10,000 rows, and peak memory; ratios against 1x.
Writes build/bench_scale.json.

    python -m benchmarks.bench_scale [--sizes 1,10,50] [--beam_args "--direct_running_mode=multi_processing ..."]
"""

import argparse
import csv
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AMOUNTS = ("fare", "tips", "trip_miles", "trip_seconds")  # jittered multiplicatively
COORDINATES = ("pickup_latitude", "pickup_longitude", "dropoff_latitude", "dropoff_longitude")


def taxi_csv() -> str:
    from components import feature_spec

    return feature_spec.load(os.path.join(REPO, "configs", "taxi.yaml")).csv_files()[0]


def write_resampled(source: str, out_path: str, factor: int, seed: int = 0) -> int:
    """Writes `factor` noisy copies of every source row; returns the row count."""
    rng = random.Random(seed)
    with open(source, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)  # the 15,000-row source only
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    written = 0
    with open(out_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for copy in range(factor):
            for row in rows:
                if copy:
                    row = dict(row)
                    scale = 1 + rng.gauss(0, 0.03)  # fare and tips together: the label stays meaningful
                    for name in AMOUNTS:
                        if row[name] != "":
                            value = float(row[name]) * (scale if name in ("fare", "tips") else 1 + rng.gauss(0, 0.03))
                            row[name] = str(int(round(value))) if name == "trip_seconds" else f"{value:.2f}"
                    for name in COORDINATES:
                        if row[name] != "":
                            row[name] = f"{float(row[name]) + rng.gauss(0, 0.002):.6f}"
                    if row["trip_start_timestamp"] != "":
                        row["trip_start_timestamp"] = str(int(row["trip_start_timestamp"]) + rng.randrange(-3600, 3600))
                writer.writerow(row)
                written += 1
    return written


class TreeMemory(threading.Thread):
    """Peak of the summed resident memory of a process and all its descendants (Linux /proc)."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak_bytes = pid, interval, 0
        self.stop = threading.Event()
        self.page = os.sysconf("SC_PAGE_SIZE")

    def _tree(self) -> List[int]:
        children: Dict[int, List[int]] = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(name))
        tree, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo += children.get(pid, [])
        return tree

    def run(self):
        while not self.stop.wait(self.interval):
            total = 0
            for pid in self._tree():
                try:
                    with open(f"/proc/{pid}/statm") as f:
                        total += int(f.read().split()[1]) * self.page
                except (OSError, IndexError, ValueError):
                    pass
            self.peak_bytes = max(self.peak_bytes, total)


def run_size(factor: int, work: str, beam_args: List[str]) -> Dict:
    data_dir = os.path.join(work, f"{factor}x", "data")
    rows = write_resampled(taxi_csv(), os.path.join(data_dir, "data.csv"), factor)
    root = os.path.join(work, f"{factor}x")
    env_path = os.path.join(root, "env.yaml")
    with open(env_path, "w") as f:
        yaml.safe_dump({"pipeline_root": f"{root}/pipelines/{{name}}", "metadata_path": f"{root}/metadata.sqlite",
                        "model_repository": f"{root}/models", "enable_cache": False, "beam_args": beam_args}, f)
    summary_path = os.path.join(root, "summary.json")
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "pipelines.local_runner", "--spec", "configs/taxi.yaml",
                                "--env", env_path, "--data", data_dir, "--summary", summary_path],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=dict(os.environ, TF_USE_LEGACY_KERAS="1"))
    memory = TreeMemory(process.pid)
    memory.start()
    code = process.wait()
    memory.stop.set()
    memory.join()
    wall = time.perf_counter() - started
    with open(summary_path) as f:
        summary = json.load(f)
    if code != 0 or not summary["succeeded"]:
        raise RuntimeError(f"{factor}x run failed: {summary.get('error')}")
    return {"factor": factor, "rows": rows, "wall_seconds": wall, "pipeline_seconds": summary["total_seconds"],
            "seconds_per_component": summary["seconds_per_component"], "peak_memory_mb": memory.peak_bytes / 2 ** 20,
            "auc": summary["metrics"]["overall"].get("auc")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,10,50", help="multiples of the taxi rows, comma-separated")
    parser.add_argument("--beam_args", default="--direct_running_mode=multi_processing --direct_num_workers=2",
                        help="Beam arguments for every run (default: the multi-processing DirectRunner)")
    parser.add_argument("--work_dir", help="where data and runs go (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    work_ctx = tempfile.TemporaryDirectory(prefix="bench-scale-") if not args.work_dir else None
    work = args.work_dir or work_ctx.name
    results = []
    try:
        for factor in sizes:
            results.append(run_size(factor, work, shlex.split(args.beam_args)))
            r = results[-1]
            print(f"{factor}x: {r['rows']} rows, {r['pipeline_seconds']:.0f} s, peak {r['peak_memory_mb']:.0f} MB",
                  flush=True)
    finally:
        if work_ctx:
            work_ctx.cleanup()
    base = results[0]
    components = list(base["seconds_per_component"])
    print("\n| size | rows | " + " | ".join(components) + " | total s | s per 10k rows | peak MB | time ratio | "
          "rows ratio | memory ratio |")
    print("|---" * (len(components) + 8) + "|")
    for r in results:
        per = " | ".join(f"{r['seconds_per_component'].get(c, 0):.1f}" for c in components)
        print(f"| {r['factor']}x | {r['rows']} | {per} | {r['pipeline_seconds']:.0f} | "
              f"{r['pipeline_seconds'] / r['rows'] * 1e4:.1f} | {r['peak_memory_mb']:.0f} | "
              f"{r['pipeline_seconds'] / base['pipeline_seconds']:.1f} | {r['rows'] / base['rows']:.0f} | "
              f"{r['peak_memory_mb'] / base['peak_memory_mb']:.2f} |")
    os.makedirs(os.path.join(REPO, "build"), exist_ok=True)
    with open(os.path.join(REPO, "build", "bench_scale.json"), "w") as f:
        json.dump({"beam_args": args.beam_args, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
