"""The block streamer: carries out a `MemoryPlan` on a FLUX.2 DiT.

Resident blocks go to one device buffer, streamed blocks to one page-locked host buffer, copied a whole
unit at a time into rotating device slots on a side CUDA stream.

Why not diffusers' `enable_group_offload`: it pins every tensor separately (PyTorch's pinned allocator
rounds each up to a power of two: 23.5 GiB pinned for 15 GiB of NF4 weights), copies one tensor at a
time, allocates the on-loaded weights from the caching allocator on every step (fragmentation under a
cap) and cannot keep some blocks resident while streaming others. Here every tensor of a unit — packed
NF4 weight, its `quant_state` (absmax, code, nested state), norm scales — is a view into one slab, so:

- the host side is a single buffer registered with `cudaHostRegister` (exact size, no rounding),
- a unit moves with one `cudaMemcpyAsync`,
- the device side is fixed at setup: resident units in one buffer, streamed unit i permanently viewing
  slot i mod K. Nothing is re-pointed or allocated while generating; a copy only refills a slot.

LoRA adapters (peft layers inside the blocks) are not streamed: they go to the resident buffer, counted by
the plan, so switching adapters never touches a slab. The NF4 layers keep bitsandbytes' canonical layout
(`keep_canonical_nf4_layout`): a streamed weight only ever changes by the bytes copied into its slot.

A step cache (`step_cache`) skips blocks, and a skipped block is not copied: the streamer prefetches a unit
only once its forward is known to run it (`step_cache.SkipSchedule`, read at the start of every forward). A
unit that was not prefetched is copied when it starts. `StreamStats` credits every copy to the forward it was
made for, so the copies saved per step can be counted against the blocks the cache skipped.

The hooks are diffusers' `ModelHook`s (named `STREAM_HOOK`) on the blocks' parts; only the transfer
logic is ours. `quant_state` lives in the same slab as its weight, so it is on the GPU whenever the weight
is (the bitsandbytes + group offloading trap of docs/design.md cannot happen).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ._host_release import HostReleaser
from ._introspection import (
    TensorRef,
    adapter_modules,
    atoms_of,
    modules_outside_atoms,
    slab_layout,
    slab_view,
    tensor_refs,
)
from ._quantization import keep_canonical_nf4_layout
from .planner import MemoryPlan
from .step_cache import SkipSchedule

STREAM_HOOK = "flux2_split_stream"


@dataclass
class StreamStats:
    copies: int = 0
    bytes_copied: int = 0
    waits: int = 0
    loads_on_demand: int = 0  # a unit was not prefetched (first step, a step cache's decision, an interrupted forward)
    log: list[int] = field(default_factory=list)  # streamed unit indices in the order they ran
    forwards: int = 0  # DiT forwards begun
    # (forward, unit) of every copy, credited to the forward it was made for (a prefetch across the end of a
    # forward counts for the next one), and of every streamed unit run; forwards count from 0.
    copied: list[tuple[int, int]] = field(default_factory=list)
    ran: list[tuple[int, int]] = field(default_factory=list)

    def copies_per_forward(self) -> list[int]:
        """Copies made for each forward begun so far."""
        counts = [0] * self.forwards
        for forward, _ in self.copied:
            if forward < self.forwards:
                counts[forward] += 1
        return counts


class _UnitHook(ModelHook):
    """On the first part of a streamed unit: make sure its slot holds it; on the last: free the slot."""

    _is_stateful = False

    def __init__(self, streamer: BlockStreamer, index: int, first: bool, last: bool):
        super().__init__()
        self.streamer, self.index, self.first, self.last = streamer, index, first, last

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if self.first:
            self.streamer.before(self.index)
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        if self.last:
            self.streamer.after(self.index)
        return output


def _pin(buffer: torch.Tensor) -> bool:
    """Page-lock `buffer` in place with cudaHostRegister: exact size, unlike `pin_memory()` whose
    allocator rounds every block up to a power of two."""
    if buffer.numel() == 0:
        return True
    err = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
    return int(err) == 0 if not hasattr(err, "value") else int(err.value) == 0


LOAD_MODES = ("stream", "copy")


class _Loader:
    """Copies source tensors into the streamer's buffers, group by group, letting each source go right
    after its copy ("stream") or keeping them all until `finish` ("copy")."""

    def __init__(self, mode: str, progress: Callable[[int, int], None] | None, groups: list[list[TensorRef]]) -> None:
        self.releaser = HostReleaser() if mode == "stream" else None
        self.kept: list[TensorRef] = []
        self.progress = progress
        self.done, self.total = 0, sum(ref.nbytes for refs in groups for ref in refs)

    def move(self, refs: list[TensorRef], dest: torch.Tensor, compute_at: torch.Tensor) -> None:
        """Copy each tensor to its slab view in `dest` and point its module at the same place in
        `compute_at` (the slot a streamed unit runs from; `dest` itself for resident tensors)."""
        for ref in refs:
            slab_view(dest, ref).copy_(ref.tensor)  # synchronous: the source is read when this returns
            if self.releaser is not None:
                self.releaser.copied(ref.tensor)
            ref.point_to(slab_view(compute_at, ref))  # a parameter lets go of its loaded storage here
            if self.releaser is not None:
                ref.release()  # buffers and quant_state tensors, replaced on their owners above
            else:
                self.kept.append(ref)
            self.done += ref.nbytes
        if self.releaser is not None:
            self.releaser.release()
        if self.progress is not None:
            self.progress(self.done, self.total)

    def finish(self) -> None:
        self.kept.clear()


class BlockStreamer:
    """Applies a `MemoryPlan` to a FLUX.2 DiT whose tensors are on the CPU (e.g. loaded from disk).

    After construction the DiT's tensors live in: one device buffer (always-resident layers and resident
    units), `plan.num_slots` device slots (streamed units, each permanently viewing slot i mod K), and one
    host buffer (the streamed units' bytes, pinned). `before(i)`/`after(i)` run from hooks.

    Loading streams (`load_mode="stream"`): each tensor is copied to its place, the module pointed at the
    copy and the source let go at once (its file pages paged out, see `_host_release`), so host memory
    holds the DiT about once while the host buffer fills (`MemoryPlan.host_load_peak_bytes`), not twice.
    `load_mode="copy"` keeps every source until the layout is done (the behaviour before issue 11; for
    benchmarks). `progress(done, total)` is called after the always-resident layers and after each unit,
    with the bytes of source tensors copied so far and in all.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        plan: MemoryPlan,
        device: torch.device | str,
        *,
        load_mode: str = "stream",
        progress: Callable[[int, int], None] | None = None,
    ):
        if load_mode not in LOAD_MODES:
            raise ValueError(f"load_mode: expected one of {', '.join(LOAD_MODES)}, got {load_mode!r}")
        self.device = torch.device(device)
        self.plan = plan
        self.stats = StreamStats()
        cuda = self.device.type == "cuda"
        atoms = {name: m for name, _, m in atoms_of(transformer)}
        keep_canonical_nf4_layout(transformer)
        adapters = adapter_modules(transformer)
        skip = frozenset(id(m) for m in adapters)

        # Resident: the top-level layers, the LoRA adapters and resident units, one device buffer.
        always = tensor_refs(modules_outside_atoms(transformer), recurse=False, skip=skip)
        resident_groups = [always + tensor_refs(adapters, recurse=False)]  # one layout step, LoRA weights included
        resident_groups += [tensor_refs([atoms[a] for a in u.atoms], skip=skip) for u in plan.units if u.resident]
        # Streamed: a host slab per unit inside one host buffer, device views into rotating slots.
        streamed = [u for u in plan.units if not u.resident]
        unit_refs = [tensor_refs([atoms[a] for a in u.atoms], skip=skip) for u in streamed]
        sizes = [slab_layout(refs) for refs in unit_refs]
        self.slot_bytes = max(sizes, default=0)
        self.num_slots = plan.num_slots if streamed else 0

        loader = _Loader(load_mode, progress, [*resident_groups, *unit_refs])
        self.resident_buffer = torch.empty(
            slab_layout([ref for group in resident_groups for ref in group]), dtype=torch.uint8, device=self.device
        )
        for refs in resident_groups:
            loader.move(refs, self.resident_buffer, self.resident_buffer)
        self.host_buffer = torch.empty(sum(sizes), dtype=torch.uint8)
        self.slots = [
            torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(self.num_slots)
        ]
        self.host_units: list[torch.Tensor] = []
        offset = 0
        for i, (refs, size) in enumerate(zip(unit_refs, sizes, strict=True)):
            host = self.host_buffer[offset : offset + size]
            offset += size
            self.host_units.append(host)
            loader.move(refs, host, self.slots[i % self.num_slots])
        loader.finish()
        self.pinned = False
        if cuda and self.host_buffer.numel():
            self.pinned = _pin(self.host_buffer)
        self.num_units = len(streamed)
        self.loaded: list[int | None] = [None] * self.num_slots
        # The blocks each streamed unit belongs to (a unit never spans the first block and another).
        self.unit_blocks = [frozenset(atom.rsplit(".", 1)[0] for atom in u.atoms) for u in streamed]
        self.schedule: SkipSchedule | None = None
        if cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self.ready = [torch.cuda.Event() for _ in range(self.num_slots)]
            self.free = [torch.cuda.Event() for _ in range(self.num_slots)]

        # Hooks on the first and last part of each streamed unit.
        self._hooked: list[torch.nn.Module] = []
        for i, unit in enumerate(streamed):
            for j, atom in enumerate(unit.atoms):
                registry = HookRegistry.check_if_exists_or_initialize(atoms[atom])
                registry.register_hook(_UnitHook(self, i, j == 0, j == len(unit.atoms) - 1), STREAM_HOOK)
                self._hooked.append(atoms[atom])

    # -- runtime -----------------------------------------------------------------------------------

    def begin_forward(self, schedule: SkipSchedule | None) -> None:
        """A DiT forward starts (`MemoryPlanHook`), under the step cache's `schedule` (None: no cache)."""
        self.schedule = schedule
        self.stats.forwards += 1

    def _may_prefetch(self, running: int, index: int, next_forward: bool) -> bool:
        """Whether unit `index` is known to run (in this forward, or the next one) while unit `running` starts."""
        schedule = self.schedule
        if schedule is None or self.unit_blocks[index] <= schedule.always_run:
            return True
        # The cache decides for all other blocks at once, before the first of them: decided (to run) once a unit
        # outside the always-run blocks has started; never known for the next forward.
        return not next_forward and not self.unit_blocks[running] <= schedule.always_run

    def _load(self, index: int, forward: int) -> None:
        slot = index % self.num_slots
        n = self.host_units[index].numel()
        self.stats.copies += 1
        self.stats.bytes_copied += n
        self.stats.copied.append((forward, index))
        if self.device.type == "cuda":
            self.copy_stream.wait_event(self.free[slot])  # the slot's previous unit has finished computing
            with torch.cuda.stream(self.copy_stream):
                self.slots[slot][:n].copy_(self.host_units[index], non_blocking=self.pinned)
            self.ready[slot].record(self.copy_stream)
        else:
            self.slots[slot][:n].copy_(self.host_units[index])
        self.loaded[slot] = index

    def before(self, index: int) -> None:
        slot = index % self.num_slots
        forward = max(self.stats.forwards - 1, 0)
        if self.loaded[slot] != index:
            self.stats.loads_on_demand += 1
            self._load(index, forward)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
        self.stats.log.append(index)
        self.stats.ran.append((forward, index))
        # Prefetch the next K-1 units that are known to run (cyclically: the last unit of a step prefetches the
        # first of the next).
        for ahead in range(1, self.num_slots):
            next_forward = index + ahead >= self.num_units
            nxt = (index + ahead) % self.num_units
            if self.loaded[nxt % self.num_slots] != nxt and self._may_prefetch(index, nxt, next_forward):
                self._load(nxt, forward + next_forward)

    def after(self, index: int) -> None:
        if self.device.type == "cuda":
            self.free[index % self.num_slots].record(torch.cuda.current_stream(self.device))

    def invalidate(self) -> None:
        """Forget what the slots hold, so every unit is copied again from the host buffer before it
        runs. Needed after the host copy of a streamed unit changed: the last unit of a forward has
        already prefetched the first unit of the next one."""
        self.loaded = [None] * self.num_slots

    def remove(self) -> None:
        """Remove the hooks and unpin the host buffer (the DiT is unusable afterwards)."""
        for module in self._hooked:
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(STREAM_HOOK, recurse=False)
        self._hooked.clear()
        if self.pinned:
            torch.cuda.synchronize(self.device)
            torch.cuda.cudart().cudaHostUnregister(self.host_buffer.data_ptr())
            self.pinned = False
