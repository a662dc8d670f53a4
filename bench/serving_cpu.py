"""CPU-only serving microbenchmark: what one prompt's response costs the server process, with no model.

A real gRPC server runs in this process over a null engine that answers at once with a fixed
(B, 512, 15360) bf16 tensor (the FLUX.2-dev embedding size); clients run in separate processes
(bench/_load_clients.py), so this process's CPU time (all its threads) is the serving cost. Variants run
back to back in one process, alternating, so they share the machine's state:
  legacy   chunk messages built by protobuf (bytes(slice) -> TensorChunk -> SerializeToString)
  current  pre-serialized chunk wire bytes (one copy), the server's default
Reports prompts/s and server CPU ms per prompt (median over rounds).

    PYTHONPATH=proto:encoder_server:client python bench/serving_cpu.py --clients 4 --seconds 8 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _serving_variants import legacy_chunks


class NullEngine:
    """Answers with a fixed tensor. With `launches`, it first imitates a GPU forward the way the model
    thread sees it: `launches` short GIL-releasing calls (the kernel launches; torch drops the GIL in each
    op), then a GIL-free wait until `gpu_ms_per_prompt` x batch has passed since the call began (the
    GPU running behind the launches; the host copy waits for it). Served slower than alone = the model
    thread was starved of the GIL by the serving work."""

    def __init__(self, width: int, launches: int = 0, gpu_ms_per_prompt: float = 0.0):
        from flux2_encoder_server.engine import make_fingerprint
        from flux2_encoder_server.families import FAMILIES

        self.fingerprint = make_fingerprint(
            FAMILIES["mistral3"], weights_id="null", revision="none", dtype=torch.bfloat16, precision="bf16",
            batching_mode="reproducible",
        )  # fmt: skip
        self.embedding_dim = width
        self.batch_sizes: Counter[int] = Counter()
        self._rows = torch.randn(64, 512, width).to(torch.bfloat16)
        self.launches = launches
        self.gpu_s_per_prompt = gpu_ms_per_prompt / 1000
        self._scratch = torch.zeros(8)
        self.calls: list[tuple[int, float, float]] = []  # (batch, seconds, seconds spent launching)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        self.batch_sizes[len(prompts)] += 1
        t0 = time.perf_counter()
        for _ in range(self.launches):
            self._scratch.add_(1.0)
        t_launch = time.perf_counter() - t0
        remaining = t0 + self.gpu_s_per_prompt * len(prompts) - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)
        out = self._rows[: len(prompts)].clone()
        self.calls.append((len(prompts), time.perf_counter() - t0, t_launch))
        return out

    launch = encode  # the server launches batches; this one answers at once


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    import asyncio

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--threads-per-process", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--width", type=int, default=15360)
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20)
    parser.add_argument("--variants", default="legacy,current")
    parser.add_argument("--out", default=None)
    parser.add_argument("--launches", type=int, default=0, help="imitated kernel launches per model call")
    parser.add_argument("--gpu-ms-per-prompt", type=float, default=0.0, help="imitated GPU time per prompt")
    parser.add_argument("--switch-ms", type=float, nargs="+", default=[1.0], help="GIL switch intervals to run")
    parser.add_argument("--max-batch", type=int, default=32)
    args = parser.parse_args()

    from flux2_encoder_server import EncoderServer, Settings

    settings = Settings(
        model="null", host="127.0.0.1", port=0, device="cpu", warmup=False, max_queued_requests=1024,
        chunk_bytes=args.chunk_bytes, cache_bytes=0, max_batch_prompts=args.max_batch,
    )  # fmt: skip
    engine = NullEngine(args.width, args.launches, args.gpu_ms_per_prompt)
    server = EncoderServer(settings, lambda _s: engine)  # type: ignore[arg-type,return-value]
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(600)

    port = run(server.start())
    run(server.load())
    pool_file = Path(tempfile.mkdtemp()) / "pool.json"
    pool_file.write_text(json.dumps([f"prompt number {i}" for i in range(64)]))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    results: dict[str, list[dict[str, float]]] = {
        f"{v}_switch{ms:g}ms": [] for v in args.variants.split(",") for ms in args.switch_ms
    }
    try:
        for _ in range(args.rounds):
            for variant in results:
                start_at = time.time() + 3.0
                stop_at = start_at + args.seconds
                procs = []
                for first in range(0, args.clients, args.threads_per_process):
                    n = min(args.threads_per_process, args.clients - first)
                    cmd = [sys.executable, str(Path(__file__).parent / "_load_clients.py"), "--target",
                           f"127.0.0.1:{port}", "--threads", str(n), "--prompts", str(pool_file),
                           "--start-at", str(start_at), "--stop-at", str(stop_at)]  # fmt: skip
                    procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env))
                ctx = legacy_chunks() if variant.startswith("legacy") else _null()
                sys.setswitchinterval(float(variant.split("switch")[1].removesuffix("ms")) / 1000)
                with ctx:
                    while time.time() < start_at:
                        time.sleep(0.01)
                    c0, t0 = cpu_s(), time.time()
                    engine.calls.clear()
                    records = []
                    for p in procs:
                        records += json.loads(p.communicate(timeout=args.seconds + 120)[0])["records"]
                    c1, t1 = cpu_s(), time.time()
                # Count prompts answered inside the CPU-measurement window.
                done = [r for r in records if t0 <= r[1] <= t1]
                row = {
                    "prompts_per_s": len(done) / (t1 - t0),
                    "server_cpu_ms_per_prompt": 1000 * (c1 - c0) / max(1, len(done)),
                    "prompts": len(done),
                }
                if engine.calls:
                    served = sum(n for n, _, _ in engine.calls)
                    row["model_ms_per_prompt"] = 1000 * sum(t for _, t, _ in engine.calls) / served
                    row["launch_ms_per_call"] = 1000 * statistics.mean(t for _, _, t in engine.calls)
                    row["mean_batch"] = served / len(engine.calls)
                results[variant].append(row)
                print(variant, {k: round(v, 2) for k, v in row.items()}, flush=True)
    finally:
        run(server.stop(0))
        loop.call_soon_threadsafe(loop.stop)
    summary = {v: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for v, rows in results.items() if rows}
    print(json.dumps({"args": vars(args), "median": summary, "rounds": results}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "median": summary, "rounds": results}, indent=1))


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    main()
