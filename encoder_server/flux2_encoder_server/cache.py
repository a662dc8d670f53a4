"""Embedding cache: an in-memory LRU bounded in bytes, optionally backed by a folder of safetensors files.

Entries are keyed by the model fingerprint digest and the exact prompt, so a cache never serves rows
of another model, and a stored row is the very tensor the model produced (hits are bit-identical).
On disk each entry is one safetensors file (no pickle) whose metadata repeats the digest and prompt;
a file whose metadata does not match what was asked for is a miss, so a hash collision or a stray file
can never be served.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_KEY = "embedding"


def _nbytes(row: torch.Tensor) -> int:
    return row.numel() * row.element_size()


class MemoryLRU:
    """Thread-safe LRU of (digest, prompt) -> row tensor, bounded by the rows' bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._rows: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, key: tuple[str, str]) -> torch.Tensor | None:
        with self._lock:
            row = self._rows.get(key)
            if row is not None:
                self._rows.move_to_end(key)
            return row

    def put(self, key: tuple[str, str], row: torch.Tensor) -> None:
        size = _nbytes(row)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._rows.pop(key, None)
            if old is not None:
                self._bytes -= _nbytes(old)
            self._rows[key] = row
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._rows.popitem(last=False)
                self._bytes -= _nbytes(evicted)


class DiskCache:
    """One safetensors file per entry under `folder`, bounded by `max_bytes` (least recently used go)."""

    def __init__(self, folder: str | Path, max_bytes: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._bytes = sum(p.stat().st_size for p in self.folder.glob("*.safetensors"))

    @staticmethod
    def _name(key: tuple[str, str]) -> str:
        digest, prompt = key
        return hashlib.sha256(f"{digest}\0{prompt}".encode("utf-8", "surrogatepass")).hexdigest() + ".safetensors"

    def get(self, key: tuple[str, str]) -> torch.Tensor | None:
        from safetensors import safe_open

        path = self.folder / self._name(key)
        try:
            with safe_open(str(path), framework="pt") as fh:  # type: ignore[no-untyped-call]
                meta = fh.metadata() or {}
                if meta.get("fingerprint") != key[0] or meta.get("prompt") != key[1]:
                    return None
                row = fh.get_tensor(_KEY)
        except FileNotFoundError:
            return None
        except Exception:  # a truncated or foreign file: treat as a miss and remove it
            log.warning("unreadable cache file %s; removing it", path, exc_info=True)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # mtime orders eviction: this entry was just used
        return row

    def put(self, key: tuple[str, str], row: torch.Tensor) -> None:
        from safetensors.torch import save

        data = save({_KEY: row.contiguous()}, metadata={"fingerprint": key[0], "prompt": key[1]})
        path = self.folder / self._name(key)
        tmp = path.with_suffix(f".tmp{threading.get_ident()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # readers never see a half-written file
        with self._lock:
            self._bytes += len(data)
            if self._bytes > self.max_bytes:
                self._evict()

    def _evict(self) -> None:
        files = sorted(self.folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for path in files:
            if total <= self.max_bytes * 0.9:  # a little headroom, so not every put rescans
                break
            size = path.stat().st_size
            with contextlib.suppress(OSError):
                path.unlink()
                total -= size
        self._bytes = total


class EmbeddingCache:
    """Memory first, then disk; a disk hit is promoted to memory. Counts hits/misses through `on_lookup`."""

    def __init__(
        self,
        memory_bytes: int,
        folder: str | None = None,
        disk_bytes: int = 0,
        on_lookup: Callable[[str, bool], None] | None = None,
    ):
        self.memory = MemoryLRU(memory_bytes) if memory_bytes > 0 else None
        self.disk = DiskCache(folder, disk_bytes) if folder else None
        self._on_lookup = on_lookup

    @property
    def enabled(self) -> bool:
        return self.memory is not None or self.disk is not None

    def get(
        self, digest: str, prompt: str, *, on_lookup: Callable[[str, bool], None] | None = None
    ) -> torch.Tensor | None:
        """May read a file: call it off the event loop when the disk tier is on. `on_lookup` counts this
        call's lookups instead of the cache's own counter (e.g. per hosted model)."""
        key = (digest, prompt)
        count = on_lookup or self._count
        if self.memory is not None:
            row = self.memory.get(key)
            count("memory", row is not None)
            if row is not None:
                return row
        if self.disk is not None:
            row = self.disk.get(key)
            count("disk", row is not None)
            if row is not None:
                if self.memory is not None:
                    self.memory.put(key, row)
                return row
        return None

    def put(self, digest: str, prompt: str, row: torch.Tensor) -> None:
        # A row of a batch tensor is a view that would keep the whole batch alive: store a copy.
        row = row.detach().to("cpu").clone()
        key = (digest, prompt)
        if self.memory is not None:
            self.memory.put(key, row)
        if self.disk is not None:
            try:
                self.disk.put(key, row)
            except OSError:
                log.warning("could not write the disk cache", exc_info=True)

    def _count(self, tier: str, hit: bool) -> None:
        if self._on_lookup is not None:
            self._on_lookup(tier, hit)
