"""Bulk caption encoding throughput vs the training script's one-request-at-a-time pattern, same server.

The anchor is what diffusers' train_dreambooth_lora_flux2.py --remote_text_encoder does: one HTTP POST
/predict per caption, `torch.load` of the answer, sequentially. Against it, `flux2-client encode`'s
engine (flux2_client.bulk.encode_captions): many requests in flight, several captions per request, shards
written as they fill; over HTTP and over gRPC. All modes encode the same distinct captions (no duplicates,
so deduplication does not flatter bulk), alternating modes over --reps rounds.

    python -m bench.bulk_encode                       # tiny random models, in-process server, CPU
    python -m bench.bulk_encode --server HOST:50051 --url http://HOST:8080/predict --token T --captions 512

With the tiny models the numbers measure the serving path (batching, serialization, transport), not a
real encoder's compute: label them as such.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests
import torch
from flux2_client.bulk import encode_captions
from flux2_client.http_encoder import HttpTextEncoder
from flux2_client.remote import RemoteTextEncoder


def training_script_pattern(url: str, token: str, captions: list[str]) -> float:
    """Seconds for the script's loop: one POST per caption, torch.load, in order."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    started = time.perf_counter()
    for caption in captions:
        response = requests.post(url, json={"prompt": caption}, headers=headers)
        assert response.status_code == 200, f"{response.status_code=} {response.text[:200]}"
        torch.load(io.BytesIO(response.content), weights_only=True)
    return time.perf_counter() - started


def bulk(encoder, captions: list[str], concurrency: int, request_prompts: int, shard_rows: int) -> float:
    out = Path(tempfile.mkdtemp(prefix="bulk-bench-"))
    try:
        started = time.perf_counter()
        result = encode_captions(
            captions,
            out,
            encoder,
            concurrency=concurrency,
            request_prompts=request_prompts,
            shard_rows=shard_rows,
            progress=False,
        )
        seconds = time.perf_counter() - started
        assert result.encoded == len(set(captions)), result
        return seconds
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", help="gRPC host:port of a running server (default: start one in-process)")
    parser.add_argument("--url", help="HTTP /predict URL of the same server (default: the in-process one)")
    parser.add_argument("--token", default=os.environ.get("FLUX2_ENCODER_TOKEN", "bench"), help="bearer token")
    parser.add_argument("--model", default=None, help="in-process server model (default: tiny random models)")
    parser.add_argument("--captions", type=int, default=64, help="distinct captions per mode and round")
    parser.add_argument("--reps", type=int, default=2, help="rounds; modes alternate within each round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--request-prompts", type=int, default=4)
    parser.add_argument("--shard-rows", type=int, default=64)
    parser.add_argument("--max-batch-prompts", type=int, default=16, help="in-process server's batch size")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (in-process server)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    server = None
    workdir = None
    if args.server is None or args.url is None:
        model = args.model
        if model is None:
            from flux2_client.tiny import make_tiny_flux2

            workdir = Path(tempfile.mkdtemp(prefix="bulk-bench-models-"))
            model = str(make_tiny_flux2(workdir).pipeline)
        from flux2_encoder_server.testing import ServerThread, local_settings

        settings = local_settings(model, http_port=0, warmup=True, max_batch_prompts=args.max_batch_prompts)
        server = ServerThread(settings).start()  # the real loader: the server as `serve` runs it
        target, url = server.target, server.http_url + "/predict"
    else:
        target, url = args.server, args.url

    script = "training script (1 prompt/request, sequential)"
    seconds: dict[str, list[float]] = {script: [], "bulk HTTP": [], "bulk gRPC": []}
    knobs = (args.concurrency, args.request_prompts, args.shard_rows)
    try:
        with HttpTextEncoder(url, token=args.token) as http_enc, RemoteTextEncoder(target) as grpc_enc:
            runners = {
                script: lambda caps: training_script_pattern(url, args.token, caps),
                "bulk HTTP": lambda caps: bulk(http_enc, caps, *knobs),
                "bulk gRPC": lambda caps: bulk(grpc_enc, caps, *knobs),
            }
            for name, run in runners.items():  # warm-up, not timed: connections, first batches, imports
                run([f"warm-up {name} {i}" for i in range(min(8, args.captions))])
            for rep in range(args.reps):
                order = list(runners) if rep % 2 == 0 else list(runners)[::-1]
                for mode, name in enumerate(order):
                    # Fresh captions per round and mode: no server-side cache can answer for the model.
                    caps = [f"round {rep} mode {mode}: photo of item {i}, style {i % 7}" for i in range(args.captions)]
                    seconds[name].append(runners[name](caps))
    finally:
        if server is not None:
            server.stop()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    anchor = statistics.median(seconds[script])
    rows = []
    print(f"{'mode':<48} {'captions/s (median)':>20} {'runs (s)':>24} {'vs script':>10}")
    for name, runs in seconds.items():
        median = statistics.median(runs)
        rate = args.captions / median
        rows.append({"mode": name, "captions_per_s": rate, "seconds": runs, "speedup": anchor / median})
        runs_text = ", ".join(f"{s:.2f}" for s in runs)
        print(f"{name:<48} {rate:>20.1f} {runs_text:>24} {anchor / median:>9.2f}x")
    report = {
        "captions": args.captions,
        "reps": args.reps,
        "concurrency": args.concurrency,
        "request_prompts": args.request_prompts,
        "model": args.model or ("tiny random models" if args.server is None else "external server"),
        "torch_threads": args.threads,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}",
        "results": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
