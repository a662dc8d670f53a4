"""What the served benchmark reads besides the clients' own clocks: the device's timeline (CUDA events
around every batch the server launches) and the server's per-request stages (its access log).

Host timestamps cannot tell a device that waited for work from one that was busy: a batch launched while
the one before it runs looks pipelined even when its kernels reach the device slower than the device runs
them. Events recorded on the stream just before and just after a batch's launch can: the device's gap
between two batches is the time between the first batch's end event and the next one's start event, and a
batch whose device time exceeds the same batch size's time alone was starved inside it.
"""

from __future__ import annotations

import itertools
import logging
import statistics
import threading
from typing import Any

import torch


class DeviceTimeline:
    """Wraps a real engine (CUDA): every launch is bracketed by two CUDA events on the launching thread's
    current stream (the engine's compute stream). Everything else passes through to the engine."""

    def __init__(self, engine: Any):
        self._engine = engine
        self._lock = threading.Lock()
        self.batches: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def _timed(self, launch: Any, n: int, arg: Any) -> Any:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        handle = launch(arg)
        end.record()
        with self._lock:
            self.batches.append((n, start, end))
        return handle

    def launch(self, prompts: list[str]) -> Any:
        return self._timed(self._engine.launch, len(prompts), prompts)

    def launch_rows(self, rows: list[Any]) -> Any:
        return self._timed(self._engine.launch_rows, len(rows), rows)

    def reset(self) -> None:
        with self._lock:
            self.batches.clear()

    def report(self, alone_ms_per_prompt: dict[int, float]) -> dict[str, Any]:
        """Device figures of the batches since `reset`: busy fraction between the first start and the last
        end, the idle gaps between batches, and the device time per prompt against the engine alone."""
        with self._lock:
            batches = list(self.batches)
        if not batches:
            return {}
        batches[-1][2].synchronize()
        first = batches[0][1]
        span_ms = first.elapsed_time(batches[-1][2])
        busy_ms = [start.elapsed_time(end) for _, start, end in batches]
        gaps_ms = [end.elapsed_time(nxt[1]) for (_, _, end), nxt in itertools.pairwise(batches)]
        prompts = sum(n for n, _, _ in batches)
        # Starved inside a batch: its device time over the engine's time alone for the nearest measured size.
        slow = []
        for (n, _, _), ms in zip(batches, busy_ms, strict=True):
            size = min(alone_ms_per_prompt, key=lambda b: abs(b - n)) if alone_ms_per_prompt else None
            if size is not None and n >= 8:
                slow.append(ms / (alone_ms_per_prompt[size] * n))
        return {
            "device_batches": len(batches),
            "device_busy_fraction": round(sum(busy_ms) / span_ms, 3) if span_ms > 0 else None,
            "device_idle_ms_total": round(sum(g for g in gaps_ms if g > 0), 1),
            "device_idle_ms_median": round(statistics.median(gaps_ms), 2) if gaps_ms else None,
            "device_ms_per_prompt": round(sum(busy_ms) / max(1, prompts), 2),
            "device_time_vs_alone_median_b8plus": round(statistics.median(slow), 3) if slow else None,
        }


class AccessLogStages:
    """Collects the server's access-log records (one per request, with its stage times) while attached."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self._handler = logging.Handler()
        self._handler.emit = self._emit  # type: ignore[method-assign]
        self._logger = logging.getLogger("flux2_encoder_server.access")

    def _emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            self.records.append(fields)

    def __enter__(self) -> AccessLogStages:
        self._previous_level = self._logger.level
        self._logger.setLevel(logging.INFO)
        self._logger.addHandler(self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self._handler)
        self._logger.setLevel(self._previous_level)

    def medians(self) -> dict[str, float]:
        """Median seconds of each stage over the OK requests (queue, encode, serialize, send, total)."""
        ok = [r for r in self.records if r.get("status") == "OK"]
        names = sorted({k for r in ok for k in r if k.endswith("_s")})
        return {f"server_{k}_median": round(statistics.median(r[k] for r in ok if k in r), 4) for k in names}
