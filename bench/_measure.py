"""What every maintained benchmark shares: the run's report, timing, and comparisons of tensors."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

GIB = 1 << 30


def log(*args: Any) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


class Report(dict[str, Any]):
    """The results of one run, written to `<out>/<name>.json` after every section, so a long GPU run
    that is cut short keeps what it measured."""

    def __init__(self, out: Path, name: str):
        super().__init__()
        self.path = out / f"{name}.json"
        out.mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        self.path.write_text(json.dumps(self, indent=1, default=str))

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """A section whose failure is recorded (and printed) instead of ending the run."""
        log(f"== {name}")
        started = time.time()
        try:
            yield
        except Exception as exc:
            self.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        finally:
            self.setdefault("section_seconds", {})[name] = round(time.time() - started, 1)
            self.save()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn: Callable[[], Any], batch: int, device: str, reps: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time of fn() (host synchronised), prompts/s, and the peak device memory it added."""
    for _ in range(warmup):
        fn()
    sync(device)
    gc.collect()
    base = 0
    if device.startswith("cuda"):
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    row = {"batch": batch, "latency_s": med, "prompts_per_s": batch / med, "min_s": min(times), "max_s": max(times)}
    if device.startswith("cuda"):
        row["peak_activation_gib"] = (torch.cuda.max_memory_allocated() - base) / GIB
    return row


def compare(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    g, w = got.double().flatten(), want.double().flatten()
    return {
        "identical": bool(torch.equal(got, want)),
        "rel_err": float((g - w).norm() / w.norm()),
        "cosine": float(torch.nn.functional.cosine_similarity(g, w, dim=0)),
        "frac_elements_differ": float((got != want).float().mean()),
        "max_abs": float((g - w).abs().max()),
    }


def row_sha(row: torch.Tensor) -> str:
    return hashlib.sha256(row.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def process_cpu_s() -> float:
    """CPU seconds of this process, all threads (the server's serving cost when it runs in this process)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def system_cpu_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of all the machine's cores since boot, from /proc/stat ((0, 0) elsewhere):
    two readings give how many cores were busy in between, whoever used them."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except OSError:
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)
