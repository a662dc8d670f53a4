"""Giving host memory back while the block streamer copies a loaded DiT into its buffers.

Dropping the last reference to a copied tensor is not always enough for the process to shrink:

- A DiT loaded from safetensors on the CPU is made of views into a private memory map of each checkpoint
  file (safetensors' `load_file`, which diffusers' `from_pretrained` uses): the map lives until the last
  tensor of that file is dropped, and the pages already read stay counted in the process's RSS. They are
  clean file pages the kernel may reclaim, but a user watching RSS sees the DiT twice. `MADV_PAGEOUT`
  (Linux 5.4+) asks the kernel to reclaim exactly the pages just copied; it never changes what a page
  reads, so it is safe even for a page shared with a neighbour that has not been copied yet.
- Tensors allocated on the heap (below glibc's mmap threshold) go back to malloc's free lists, not to the
  system; `malloc_trim(0)` returns the free pages.

Both are best effort: on other systems, or where the call fails, nothing happens.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import mmap
import sys
from functools import cache

import torch

_MADV_PAGEOUT = 21  # linux/mman-common.h


@cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def file_backed_ranges() -> list[tuple[int, int]]:
    """Sorted (start, end) address ranges of this process's private memory maps of regular files (from
    /proc/self/maps); empty where that file does not exist."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                # address perms offset dev inode [path]: a file has an inode; "p" = private mapping.
                if len(fields) == 6 and fields[4] != "0" and fields[1][3] == "p" and fields[5].startswith("/"):
                    lo, hi = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((lo, hi))
    except OSError:
        return []
    return sorted(ranges)


def _merge(spans: list[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    """Sorted, merged intervals: two closer than `gap` bytes become one."""
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if merged and lo - merged[-1][1] <= gap:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


class HostReleaser:
    """Pages out copied tensors that view a file map (see the module docstring) and trims malloc.

    `copied(tensor)` after each copy, `release()` after each group of tensors (a unit). The kernel
    reclaims a large page-cache folio only when one call covers it whole: one call per tensor left most
    of a tiny checkpoint mapped (Linux 6.18, 16 KiB folios). So a group's spans are merged, gaps of up to
    `MERGE_GAP` bytes included (the small tensors nobody keeps, like bitsandbytes' packed quant_state
    JSON; at worst a neighbour not copied yet is read from the file again), and each merged span is
    widened by up to `FOLIO_REACH` into what earlier groups copied, so the folios it shares with them are
    covered too. On that checkpoint only the safetensors header stays mapped (tests/test_host_ram.py).
    """

    MERGE_GAP = 64 << 10
    FOLIO_REACH = 2 << 20  # the largest page-cache folio (a PMD) on x86-64 and arm64 with 4 KiB pages

    def __init__(self) -> None:
        self._libc = _libc()
        self._ranges = file_backed_ranges() if self._libc is not None else []
        self._starts = [lo for lo, _ in self._ranges]
        self._spans: list[tuple[int, int]] = []  # copied since the last release
        self._done: list[tuple[int, int]] = []  # copied and paged out, merged like a group

    def _in_file_map(self, lo: int, hi: int) -> bool:
        i = bisect.bisect_right(self._starts, lo) - 1
        return i >= 0 and self._ranges[i][0] <= lo and hi <= self._ranges[i][1]

    def copied(self, tensor: torch.Tensor) -> None:
        """Note a tensor whose bytes were just copied (its pages are paged out at `release`, if they
        belong to a file map; they read the same afterwards, from the file)."""
        if not self._ranges or tensor.device.type != "cpu" or tensor.numel() == 0:
            return
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        if self._in_file_map(start, end):
            self._spans.append((start, end))

    def release(self) -> None:
        """Page out the spans noted since the last call, then return malloc's free pages (glibc)."""
        group = _merge(self._spans, self.MERGE_GAP)
        self._spans.clear()
        self._done = _merge(self._done + group, self.MERGE_GAP)
        page = mmap.PAGESIZE
        for lo, hi in group:
            # The copied interval holding this span bounds how far it may be widened.
            around = self._done[bisect.bisect_right(self._done, (lo, hi)) - 1]
            lo, hi = max(around[0], lo - self.FOLIO_REACH), min(around[1], hi + self.FOLIO_REACH)
            lo, hi = lo // page * page, -(-hi // page) * page
            assert self._libc is not None  # spans are noted only with libc
            self._libc.madvise(lo, hi - lo, _MADV_PAGEOUT)  # EINVAL before Linux 5.4: nothing happens
        trim = getattr(self._libc, "malloc_trim", None)
        if trim is not None:
            trim(0)
