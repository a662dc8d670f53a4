"""CPU-only serving microbenchmark: what one prompt's response costs the server process, with no model.

A real gRPC server (`flux2_encoder_server.testing.ServerThread`) runs in this process over a fake engine
that answers with fixed (B, 512, 15360) bf16 rows (the FLUX.2-dev embedding size); clients run in
separate processes (bench/_load_clients.py), so this process's CPU time (all its threads) is the serving
cost. `--launches` / `--gpu-ms-per-prompt` make the fake engine imitate a GPU model thread: short
GIL-releasing calls per batch (the kernel launches), then rows ready only once the imitated device has
run the batch. Rounds alternate the GIL switch intervals given, so they share the machine's state.
Reports prompts/s and server CPU ms per prompt (median over rounds).

    python -m bench.serving_cpu --clients 4 --seconds 8 --rounds 3      # from the repository root

The legacy-vs-pre-serialized chunk A/B this script ran on 2026-11-26 (docs/benchmarks.md) is archived:
bench/archive/2026-11-26/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ._measure import process_cpu_s

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_round(
    engine: Any, target: str, pool_file: Path, args: argparse.Namespace, switch_ms: float
) -> dict[str, float]:
    """One measurement window of `args.seconds` with `args.clients` closed-loop clients."""
    start_at = time.time() + 3.0
    stop_at = start_at + args.seconds
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = []
    for first in range(0, args.clients, args.threads_per_process):
        n = min(args.threads_per_process, args.clients - first)
        cmd = [sys.executable, "-m", "bench._load_clients", "--target", target, "--threads", str(n),
               "--prompts", str(pool_file), "--start-at", str(start_at), "--stop-at", str(stop_at)]  # fmt: skip
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, cwd=REPO_ROOT))
    sys.setswitchinterval(switch_ms / 1000)
    while time.time() < start_at:
        time.sleep(0.01)
    c0, t0 = process_cpu_s(), time.time()
    engine.reset_counts()
    records = []
    for p in procs:
        records += json.loads(p.communicate(timeout=args.seconds + 120)[0])["records"]
    c1, t1 = process_cpu_s(), time.time()
    # Count prompts answered inside the CPU-measurement window.
    done = [r for r in records if t0 <= r[1] <= t1]
    row = {
        "prompts_per_s": len(done) / (t1 - t0),
        "server_cpu_ms_per_prompt": 1000 * (c1 - c0) / max(1, len(done)),
        "prompts": len(done),
    }
    answered = [r for r in engine.records if r.finished_at is not None]
    if answered:
        served = sum(len(r.prompts) for r in answered)
        row["model_ms_per_prompt"] = 1000 * sum(r.finished_at - r.launched_at for r in answered) / served
        row["launch_ms_per_call"] = 1000 * statistics.mean(r.launch_seconds for r in answered)
        row["mean_batch"] = served / len(answered)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--threads-per-process", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--width", type=int, default=15360)
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20)
    parser.add_argument("--out", default=None)
    parser.add_argument("--launches", type=int, default=0, help="imitated kernel launches per model call")
    parser.add_argument("--gpu-ms-per-prompt", type=float, default=0.0, help="imitated GPU time per prompt")
    parser.add_argument("--switch-ms", type=float, nargs="+", default=[1.0], help="GIL switch intervals to run")
    parser.add_argument("--max-batch", type=int, default=32)
    args = parser.parse_args()

    from flux2_encoder_server.testing import FakeEngine, ServerThread, local_settings

    settings = local_settings(
        "null", max_queued_requests=1024, chunk_bytes=args.chunk_bytes, cache_bytes=0, max_batch_prompts=args.max_batch
    )
    engine = FakeEngine(width=args.width, launch_ops=args.launches, device_ms_per_prompt=args.gpu_ms_per_prompt)
    pool_file = Path(tempfile.mkdtemp()) / "pool.json"
    pool_file.write_text(json.dumps([f"prompt number {i}" for i in range(64)]))
    results: dict[str, list[dict[str, float]]] = {f"switch{ms:g}ms": [] for ms in args.switch_ms}
    previous_switch = sys.getswitchinterval()
    with ServerThread(settings, lambda _s: engine) as server:
        try:
            for _ in range(args.rounds):
                for ms in args.switch_ms:
                    row = run_round(engine, server.target, pool_file, args, ms)
                    results[f"switch{ms:g}ms"].append(row)
                    print(f"switch{ms:g}ms", {k: round(v, 2) for k, v in row.items()}, flush=True)
        finally:
            sys.setswitchinterval(previous_switch)
    summary = {v: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for v, rows in results.items() if rows}
    report = {"args": vars(args), "median": summary, "rounds": results}
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
