"""Load generator for the served-path benchmark: one process, `--threads` concurrent gRPC clients.

Each thread loops until `--stop-at` (a time.time() value): it sends one Encode request with one prompt
from the pool and records when it started and ended, which prompt it was, the sha256 the server sent for
the payload, the batching mode and the thread's index. The records go to stdout as one JSON document.
Several such processes together make the N concurrent clients (one Python process cannot receive 32 x
15.7 MB streams fast enough alone).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--prompts", required=True, help="JSON file with the prompt pool")
    parser.add_argument("--start-at", type=float, required=True)
    parser.add_argument("--stop-at", type=float, required=True)
    parser.add_argument("--first-thread", type=int, default=0, help="global index of this process's first thread")
    args = parser.parse_args()

    # Everything a first request would import or set up (torch, the channel, the first call) happens before
    # --start-at, in one untimed warm-up request per thread: before this, the first request of every client
    # paid for importing torch (seconds on the H200 host) inside the measured window, and a run's first
    # seconds measured the clients starting, not the server serving.
    import torch
    from flux2_client.remote import RemoteTextEncoder

    torch.frombuffer(bytearray(4), dtype=torch.uint8)

    with open(args.prompts) as fh:
        pool: list[str] = json.load(fh)
    records: list[tuple[float, float, int, str, int, int]] = []
    ready: list[float] = []  # when each thread had its warm-up answered
    errors: list[str] = []
    lock = threading.Lock()

    def worker(thread_index: int) -> None:
        k = thread_index * 7  # threads walk the pool from different places
        # A connection per client thread: channels of one process otherwise share one, and a `--frontends`
        # server's kernel spreads connections (not calls) over its front-end processes.
        options = [("grpc.use_local_subchannel_pool", 1)]
        with RemoteTextEncoder(args.target, timeout=300, channel_options=options) as enc:
            try:
                enc.encode([pool[k % len(pool)]])
            except Exception as exc:
                with lock:
                    errors.append(f"warm-up: {type(exc).__name__}: {exc}")
            with lock:
                ready.append(time.time())
            while time.time() < args.start_at:
                time.sleep(0.005)
            while time.time() < args.stop_at:
                idx = k % len(pool)
                k += 1
                started = time.time()
                try:
                    result = enc.encode([pool[idx]])
                except Exception as exc:  # recorded, the run goes on
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                ended = time.time()
                with lock:
                    mode = int(result.header.batching_mode)
                    records.append((started, ended, idx, result.header.sha256.hex(), mode, thread_index))

    threads = [threading.Thread(target=worker, args=(args.first_thread + i,)) for i in range(args.threads)]
    for t in threads:
        t.start()
    while time.time() < args.start_at:
        time.sleep(0.005)
    cpu0 = time.process_time()  # this process's CPU (all threads) from the start of the load on
    for t in threads:
        t.join()
    cpu_s = time.process_time() - cpu0
    out = {
        "records": records,
        "errors": errors[:20],
        "error_count": len(errors),
        "cpu_s": cpu_s,
        "last_ready_at": max(ready, default=None),
    }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
