"""What the model process and its front-end processes share (`--frontends N`, docs/design.md#architecture):
length-prefixed frames over a Unix stream socket, and the response ring, a shared memory region the model
process writes each answer into once and the front-end streams from.

A frame is a JSON header (a dict with a "t" key naming the message) and optional binary attachments
(upsampling reference images): `!II` header length and attachment count, `!Q` per attachment length,
the header bytes, then the attachments. Nothing is ever pickled.

The ring is one `memfd_create` region (no name in /dev/shm: it ends with the processes that map it),
reserved up front with `posix_fallocate` so a host short of memory refuses at start instead of a SIGBUS
mid-request. The model process owns the allocator (`ResponseRing`, first fit); a front-end maps the same
fd (`RingView`) and reads the regions it is told about.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import mmap
import os
import struct
from typing import Any

import torch

__all__ = ["FrameError", "ResponseRing", "RingTooSmall", "RingView", "read_frame", "write_frame"]

_PREFIX = struct.Struct("!II")
_LENGTH = struct.Struct("!Q")
#: Largest JSON header accepted (prompts travel in it: max_prompts_per_request x max_prompt_chars).
MAX_HEADER_BYTES = 1 << 30
#: Regions start on this boundary (cache lines; also keeps every dtype's view aligned).
ALIGN = 64


class FrameError(Exception):
    """The peer sent something that is not a frame of this protocol."""


def encode_frame(header: dict[str, Any], attachments: list[bytes] | tuple[bytes, ...] = ()) -> bytes:
    body = json.dumps(header, separators=(",", ":")).encode()
    parts = [_PREFIX.pack(len(body), len(attachments))]
    parts += [_LENGTH.pack(len(a)) for a in attachments]
    parts.append(body)
    parts += attachments
    return b"".join(parts)


def write_frame(
    writer: asyncio.StreamWriter, header: dict[str, Any], attachments: list[bytes] | tuple[bytes, ...] = ()
) -> None:
    """Queue one frame on `writer` (the caller drains when it wants back-pressure)."""
    writer.write(encode_frame(header, attachments))


async def read_frame(reader: asyncio.StreamReader) -> tuple[dict[str, Any], list[bytes]]:
    """The next frame; asyncio.IncompleteReadError at the end of the stream."""
    header_len, count = _PREFIX.unpack(await reader.readexactly(_PREFIX.size))
    if header_len > MAX_HEADER_BYTES or count > 1024:
        raise FrameError(f"frame header of {header_len} bytes with {count} attachments")
    lengths = [_LENGTH.unpack(await reader.readexactly(_LENGTH.size))[0] for _ in range(count)]
    header = json.loads(await reader.readexactly(header_len))
    if not isinstance(header, dict) or "t" not in header:
        raise FrameError("frame header is not a message")
    return header, [await reader.readexactly(n) for n in lengths]


class RingTooSmall(RuntimeError):
    """The host cannot reserve the response ring (memory, or memfd/fallocate unsupported)."""


def available_memory() -> int | None:
    """Bytes this process may still take: the host's MemAvailable, less where the cgroup (v2) limit is
    tighter; None when neither can be read."""
    found: list[int] = []
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            limit = fh.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as fh:
                found.append(int(limit) - int(fh.read().strip()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def _view(buffer: mmap.mmap, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = itemsize
    for size in shape:
        count *= size
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=torch.uint8, count=count, offset=offset).view(dtype).view(shape)


class ResponseRing:
    """The model process's side: the memfd, its mapping and the first-fit allocator of its regions.

    `alloc(nbytes)` returns an offset or None (no free run that long: only fragmentation, since admission
    bounds the bytes in flight by the ring's size); `free(offset)` gives a region back. Single-threaded:
    called from the event loop only."""

    def __init__(self, size: int):
        self.size = max(ALIGN, -(-size // ALIGN) * ALIGN)
        available = available_memory()
        if available is not None and self.size > available:
            # Checked first: memfd pages are reserved one by one, so fallocate on a host without the memory
            # would not fail cleanly but push the host (or the container's cgroup) into the OOM killer.
            raise RingTooSmall(
                f"the response ring needs {self.size} bytes of memory (--max-inflight-bytes) but only "
                f"{available} are available; lower --max-inflight-bytes or give the server more memory"
            )
        try:
            self.fd = os.memfd_create("flux2-response-ring", 0)  # no MFD_CLOEXEC needed: pass_fds decides
        except (AttributeError, OSError) as exc:
            raise RingTooSmall(f"cannot create the response ring (memfd_create): {exc}") from None
        try:
            os.posix_fallocate(self.fd, 0, self.size)
        except OSError as exc:
            os.close(self.fd)
            raise RingTooSmall(
                f"cannot reserve the {self.size} byte response ring (--max-inflight-bytes) in memory: "
                f"{exc.strerror}; lower --max-inflight-bytes or give the server more memory"
            ) from None
        self.buffer = mmap.mmap(self.fd, self.size)
        self._free: list[tuple[int, int]] = [(0, self.size)]  # sorted (offset, length) runs
        self._taken: dict[int, int] = {}  # offset -> length
        self.used_bytes = 0
        self._freed = asyncio.Event()

    def alloc(self, nbytes: int) -> int | None:
        length = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        for i, (offset, run) in enumerate(self._free):
            if run >= length:
                if run == length:
                    del self._free[i]
                else:
                    self._free[i] = (offset + length, run - length)
                self._taken[offset] = length
                self.used_bytes += length
                return offset
        return None

    async def alloc_waiting(self, nbytes: int, timeout: float) -> int | None:
        """`alloc`, waiting up to `timeout` seconds for frees when the ring is fragmented."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (offset := self.alloc(nbytes)) is None:
            left = deadline - loop.time()
            if left <= 0:
                return None
            self._freed.clear()
            try:
                await asyncio.wait_for(self._freed.wait(), left)
            except TimeoutError:
                return self.alloc(nbytes)
        return offset

    def free(self, offset: int) -> None:
        length = self._taken.pop(offset)
        self.used_bytes -= length
        i = bisect.bisect(self._free, (offset, 0))
        self._free.insert(i, (offset, length))
        # Merge with the next run, then with the previous one.
        if i + 1 < len(self._free) and offset + length == self._free[i + 1][0]:
            length += self._free.pop(i + 1)[1]
            self._free[i] = (offset, length)
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            prev_offset, prev_length = self._free.pop(i - 1)
            self._free[i - 1] = (prev_offset, prev_length + length)
        self._freed.set()

    def write(self, offset: int, tensor: torch.Tensor) -> None:
        """Copy `tensor` into the region at `offset` (blocking: run it off the event loop)."""
        _view(self.buffer, offset, tensor.dtype, tuple(tensor.shape)).copy_(tensor)

    def register_with_cuda(self) -> bool:
        """Page-lock the ring for CUDA (device-to-host copies can then land in it directly); False where
        there is no CUDA or the driver refuses."""
        if not torch.cuda.is_available():
            return False
        try:
            pointer = torch.frombuffer(self.buffer, dtype=torch.uint8).data_ptr()
            return int(torch.cuda.cudart().cudaHostRegister(pointer, self.size, 0)) == 0
        except Exception:  # an optional speed-up; the ring works unregistered
            return False


class RingView:
    """A front-end process's side: the same memfd mapped once, regions read as tensors."""

    def __init__(self, fd: int, size: int):
        self.size = size
        self.buffer = mmap.mmap(fd, size)
        os.close(fd)

    def tensor(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return _view(self.buffer, offset, dtype, shape)
