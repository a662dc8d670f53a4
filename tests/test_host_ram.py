"""Host RAM while the block streamer lays out a loaded DiT (issue 11): each source tensor is let go as soon
as it is copied, so host memory never holds the DiT twice; pages of the memory-mapped checkpoint are
given back as they are copied; the plan reports the host RAM the streamer really allocates.

Live bytes are counted exactly with weak references to the source tensors' storages (a storage expires
when nothing holds it any more), not with RSS, which allocator caches blur at this size. The same checks
on the old behaviour (`load_mode="copy"`, sources kept until the end) fail, so they can fail. Host RSS on
a GPU with the real-size DiT: `python -m bench.lowvram` (docs/benchmarks.md)."""

from __future__ import annotations

import mmap
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from flux2_client._host_release import HostReleaser
from flux2_client._introspection import tensor_refs
from flux2_client._quantization import load_nf4_transformer
from flux2_client.offload import apply_block_streaming, get_memory_plan, spec_from_module
from flux2_client.planner import (
    HOST_PROCESS_BYTES,
    Budget,
    GiB,
    Workload,
    _group_units,
    activation_bytes,
    plan_memory,
    spec_from_config,
    vae_decode_bytes,
)
from torch.multiprocessing.reductions import StorageWeakRef

WORKLOAD = Workload(64, 64)


def streaming_plan(model: torch.nn.Module):
    """A CPU plan for the tiny DiT that keeps some units resident and streams the others through two slots."""
    spec = spec_from_module(model)
    work = max(activation_bytes(spec, WORKLOAD), vae_decode_bytes(spec, WORKLOAD, tiled=False))
    block = max(n for _, n in _group_units(spec, "block"))
    vram = int((spec.other_bytes + work + 2.5 * block) / 0.94)  # the planner keeps a 6% margin
    plan = plan_memory(spec, WORKLOAD, Budget(vram=vram, device_type="cpu"))
    assert plan.mode == "stream" and plan.streamed_units and any(u.resident for u in plan.units)
    return plan


def sources(model: torch.nn.Module) -> list[tuple[StorageWeakRef, int]]:
    """A weak reference to the storage of every tensor the DiT computes with, and its bytes."""
    return [(StorageWeakRef(ref.tensor.untyped_storage()), ref.nbytes) for ref in tensor_refs([model])]


def alive(refs: list[tuple[StorageWeakRef, int]]) -> int:
    return sum(n for weak, n in refs if not weak.expired())


@pytest.mark.parametrize("load_mode", ["stream", "copy"])
def test_each_source_is_let_go_as_soon_as_it_is_copied(tiny, load_mode):
    model = load_nf4_transformer(str(tiny.nf4_repo), device="cpu")
    plan = streaming_plan(model)
    loaded = sources(model)
    total = sum(n for _, n in loaded)
    seen: list[tuple[int, int, int]] = []  # (copied, alive, total) after each step of the layout

    def progress(done: int, all_bytes: int) -> None:
        seen.append((done, alive(loaded), all_bytes))

    apply_block_streaming(model, plan, "cpu", load_mode=load_mode, progress=progress)
    # One step for the always-resident layers and one per unit, in order, covering every source.
    assert len(seen) == 1 + len(plan.units)
    assert [s[0] for s in seen] == sorted(s[0] for s in seen) and seen[-1][0] == seen[-1][2] == total
    over = [(done, live) for done, live, _ in seen if live > total - done]
    if load_mode == "stream":
        # Host memory never holds a tensor and its copy beyond the one being copied: at every step the
        # sources still alive are at most the bytes not yet copied, and at the end none is left.
        assert not over, f"sources kept after their copy: {over}"
        assert alive(loaded) == 0
    else:
        # The old behaviour: buffers and quant_state tensors (absmax, code) outlive their copies.
        assert over


def _mapped_rss(path: Path) -> int | None:
    """Resident bytes of this process's memory maps of `path` (/proc/self/smaps); None if not mapped."""
    rss, mapped, current = 0, False, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):  # a mapping's header line; its fields follow
                current = line.rstrip("\n").endswith(" " + str(path))
                mapped |= current
            elif current and line.startswith("Rss:"):
                rss += int(line.split()[1]) * 1024
    return rss if mapped else None


def _pageout_reclaims_file_pages(directory: Path) -> bool:
    """Whether the streamer's releaser reclaims a private file map's pages here: not before Linux 5.4,
    nor where the sandbox ignores MADV_PAGEOUT or hides file maps from /proc/self/maps. The release is
    best effort there (flux2_client/_host_release.py); this probe, the same releaser on a 1 MiB file map,
    tells the test to skip instead of failing on what the kernel does not offer."""
    probe = directory / "pageout-probe.bin"
    probe.write_bytes(os.urandom(1 << 20))
    fd = os.open(probe, os.O_RDONLY)
    try:
        os.fsync(fd)
        with mmap.mmap(fd, 0, access=mmap.ACCESS_COPY) as mapped:
            pages = torch.frombuffer(mapped, dtype=torch.uint8)
            pages[:: mmap.PAGESIZE].sum()  # read every page in
            before = _mapped_rss(probe.resolve()) or 0
            releaser = HostReleaser()
            releaser.copied(pages)
            releaser.release()
            after = _mapped_rss(probe.resolve()) or 0
            del pages
    finally:
        os.close(fd)
        probe.unlink()
    return after < before // 2


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")
@pytest.mark.parametrize("load_mode", ["stream", "copy"])
def test_checkpoint_pages_are_given_back_while_copying(tiny, tmp_path, load_mode):
    """diffusers loads the DiT on the CPU as views into a private memory map of the safetensors file, which
    lives while any of its tensors does. The streamer pages out what it has copied (MADV_PAGEOUT): with
    one source still held (as another shard's tensors would hold a real checkpoint's map), the map keeps
    only the pages no tensor covers (the safetensors header).

    The kernel pages out only pages no other map holds, and earlier tests in this process keep pipelines
    loaded from the shared tiny checkpoint: this test loads its own copy of it."""
    nf4_repo = Path(shutil.copytree(tiny.nf4_repo, tmp_path / "nf4"))
    checkpoint = (nf4_repo / "transformer" / "diffusion_pytorch_model.safetensors").resolve()
    if load_mode == "stream" and not _pageout_reclaims_file_pages(checkpoint.parent):
        pytest.skip("MADV_PAGEOUT reclaims no file pages on this kernel/filesystem: the release is best effort")
    # The fixture wrote the file moments ago: the kernel reclaims its pages only once they are on disk.
    fd = os.open(checkpoint, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    model = load_nf4_transformer(str(nf4_repo), device="cpu")
    if any(getattr(m, "support_avx512bf16_for_cpu", False) for m in model.modules()):
        pytest.skip("bitsandbytes repacks NF4 weights on this CPU before the layout: the sources are not the map")
    before = _mapped_rss(checkpoint)
    if before is None:
        pytest.skip("safetensors did not memory-map the checkpoint here")
    held = next(iter(model.buffers()), None)
    held = held if held is not None else next(iter(model.parameters())).data
    header = 8 + int.from_bytes(checkpoint.read_bytes()[:8], "little")
    data_bytes = checkpoint.stat().st_size - header
    assert before >= data_bytes // 2  # loading read the tensors through the map
    apply_block_streaming(model, streaming_plan(model), "cpu", load_mode=load_mode)
    after = _mapped_rss(checkpoint)
    assert after is not None  # `held` keeps the map
    if load_mode == "stream":
        assert after <= header + 2 * mmap.PAGESIZE, (before, after)
    else:
        assert after >= data_bytes // 2
    del held


def test_plan_counts_the_host_memory_the_streamer_allocates(tiny):
    """On a CPU device every buffer is host memory: the plan's steady figure is exactly the streamer's
    resident buffer + slots + host buffer (+ the process allowance)."""
    model = load_nf4_transformer(str(tiny.nf4_repo), device="cpu")
    plan = streaming_plan(model)
    streamer = apply_block_streaming(model, plan, "cpu")
    allocated = streamer.resident_buffer.numel() + streamer.host_buffer.numel() + sum(s.numel() for s in streamer.slots)
    assert allocated == plan.host_steady_bytes - HOST_PROCESS_BYTES
    assert get_memory_plan(model).host_pinned_bytes == streamer.host_buffer.numel()


def test_plan_reports_host_ram_for_the_real_model():
    spec = spec_from_config({}, vae_bytes=170 << 20)  # FLUX.2-dev's shapes
    for vram_gib in (4, 8, 12, 24):
        plan = plan_memory(spec, Workload(1024, 1024), Budget(vram=vram_gib * GiB))
        # Loading: the DiT as loaded plus the VAE (or one tensor in flight); never the DiT twice.
        assert plan.host_load_peak_bytes == spec.loaded_bytes + max(spec.vae_bytes, spec.largest_tensor) + (
            HOST_PROCESS_BYTES
        )
        assert plan.host_load_peak_bytes <= spec.loaded_bytes + 2 * GiB
        assert plan.host_steady_bytes == plan.host_pinned_bytes + HOST_PROCESS_BYTES
        text = plan.describe()
        assert "host RAM        peak" in text and "while loading" in text
    assert plan.mode == "resident" and plan.host_pinned_bytes == 0
    # The largest tensor is the fused qkv+MLP weight of a single block, packed NF4: 6144 x 55296 / 2 bytes.
    assert spec.largest_tensor == 6144 * 55296 // 2
