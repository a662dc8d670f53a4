"""Carrying out a `MemoryPlan`: resident blocks in one device buffer, streamed blocks in one pinned host
buffer, copied a whole unit at a time into rotating device slots on a side CUDA stream.

Why not diffusers' `enable_group_offload`: it pins every tensor separately (PyTorch's pinned allocator
rounds each up to a power of two: 23.5 GiB pinned for 15 GiB of NF4 weights), copies one tensor at a
time, allocates the on-loaded weights from the caching allocator on every step (fragmentation under a
cap) and cannot keep some blocks resident while streaming others. Here every tensor of a unit — packed
NF4 weight, its `quant_state` (absmax, code, nested state), norm scales — is a view into one slab, so:

- the host side is a single buffer registered with `cudaHostRegister` (exact size, no rounding),
- a unit moves with one `cudaMemcpyAsync`,
- the device side is fixed at setup: resident units in one buffer, streamed unit i permanently viewing
  slot i mod K. Nothing is re-pointed or allocated while generating; a copy only refills a slot.

The hooks are diffusers' `ModelHook`s on the blocks' parts; only the transfer logic is ours.
`quant_state` lives in the same slab as its weight, so it is on the GPU whenever the weight is (the
bitsandbytes + group offloading trap in docs/design.md#bitsandbytes-and-offloading cannot happen).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .planner import (
    TENSOR_ALIGN,
    VAE_TILED_BYTES,
    VAE_UNTILED_BYTES_PER_MPIXEL,
    Atom,
    Budget,
    MemoryPlan,
    ModelSpec,
    Workload,
    plan_memory,
)

HOOK_NAME = "flux2_split_stream"


def _align(n: int) -> int:
    return (n + TENSOR_ALIGN - 1) // TENSOR_ALIGN * TENSOR_ALIGN


@dataclass
class _TensorRef:
    """Where a tensor lives on its module, so it can be pointed at a slab view."""

    owner: Any
    kind: str  # "param", "buffer" or "attr" (a QuantState field)
    name: str
    tensor: torch.Tensor
    offset: int = 0

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def point_to(self, view: torch.Tensor) -> None:
        if self.kind == "param":
            self.owner._parameters[self.name].data = view
        elif self.kind == "buffer":
            self.owner._buffers[self.name] = view
        else:
            setattr(self.owner, self.name, view)


def _quant_state_refs(state: Any) -> Iterator[tuple[Any, str, torch.Tensor]]:
    for name in ("absmax", "code", "offset"):
        value = getattr(state, name, None)
        if isinstance(value, torch.Tensor):
            yield state, name, value
    nested = getattr(state, "state2", None)
    if nested is not None:
        yield from _quant_state_refs(nested)


def _tensor_refs(modules: list[torch.nn.Module], recurse: bool = True) -> list[_TensorRef]:
    """Every tensor the modules (with their children if `recurse`) compute with: parameters, buffers and
    bitsandbytes quant_state tensors, each once."""
    refs: list[_TensorRef] = []
    seen: set[int] = set()

    def add(owner: Any, kind: str, name: str, tensor: torch.Tensor) -> None:
        if id(tensor) in seen:
            return
        seen.add(id(tensor))
        refs.append(_TensorRef(owner, kind, name, tensor))

    for root in modules:
        for module in root.modules() if recurse else [root]:
            for name, param in module._parameters.items():
                if param is None:
                    continue
                add(module, "param", name, param)
                state = getattr(param, "quant_state", None)
                if state is not None:
                    for owner, attr, t in _quant_state_refs(state):
                        add(owner, "attr", attr, t)
            for name, buf in module._buffers.items():
                if buf is not None:
                    add(module, "buffer", name, buf)
    return refs


def _layout(refs: list[_TensorRef]) -> int:
    offset = 0
    for ref in refs:
        ref.offset = offset
        offset += _align(ref.nbytes)
    return offset


def _view(buffer: torch.Tensor, ref: _TensorRef) -> torch.Tensor:
    t = ref.tensor
    return buffer[ref.offset : ref.offset + ref.nbytes].view(t.dtype).view(t.shape)


def _atoms_of(transformer: torch.nn.Module) -> list[tuple[str, str, torch.nn.Module]]:
    """(atom name, block name, module) in execution order: each block's children that hold tensors. The
    FLUX.2 blocks register their children in the order they run them (norm1, attn, norm2, ff, ...)."""
    atoms = []
    for list_name in ("transformer_blocks", "single_transformer_blocks"):
        for i, block in enumerate(getattr(transformer, list_name)):
            block_name = f"{list_name}.{i}"
            for child_name, child in block.named_children():
                if _tensor_refs([child]):
                    atoms.append((f"{block_name}.{child_name}", block_name, child))
    return atoms


def _prepack_for_cpu(modules: list[torch.nn.Module]) -> None:
    """bitsandbytes on avx512_bf16 CPUs repacks an NF4 weight into another layout at its first forward
    and replaces `weight.data`; a slot-backed weight would then stop seeing its slot. Repacking once
    before the slabs are laid out gives the layout every forward (and the unoffloaded model) uses."""
    try:
        from bitsandbytes.nn import Linear4bit
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu  # type: ignore[attr-defined]
    except ImportError:
        return
    for root in modules:
        for m in root.modules():
            if not isinstance(m, Linear4bit) or not getattr(m, "support_avx512bf16_for_cpu", False):
                continue
            state = m.weight.quant_state
            if state is None or getattr(state, "packing_format_for_cpu", False):
                continue
            m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu(m.weight.data, state)


def spec_from_module(transformer: Any, vae: Any = None) -> ModelSpec:
    """Byte counts of a loaded DiT (as the slabs will hold them) for the planner."""
    atoms = tuple(Atom(name, block, _layout(_tensor_refs([m]))) for name, block, m in _atoms_of(transformer))
    atom_ids = {id(sub) for _, _, m in _atoms_of(transformer) for sub in m.modules()}
    other_refs = _tensor_refs([m for m in transformer.modules() if id(m) not in atom_ids], recurse=False)
    largest = 0
    for m in transformer.modules():
        if isinstance(m, torch.nn.Linear) and getattr(m.weight, "quant_state", None) is not None:
            largest = max(largest, m.in_features * m.out_features * 2)
    cfg = transformer.config
    d = cfg.num_attention_heads * cfg.attention_head_dim
    vae_bytes = 0
    vae_scale = 1.0
    if vae is not None:
        vae_bytes = sum(_align(t.numel() * t.element_size()) for t in [*vae.parameters(), *vae.buffers()])
        vae_scale = vae.config.block_out_channels[0] / 128
    return ModelSpec(
        atoms=atoms,
        other_bytes=_layout(other_refs),
        hidden=d,
        mlp_hidden=int(d * cfg.mlp_ratio),
        largest_dequantized_bytes=largest,
        vae_bytes=vae_bytes,
        vae_untiled_bytes_per_mpixel=int(VAE_UNTILED_BYTES_PER_MPIXEL * vae_scale),
        vae_tiled_bytes=int(VAE_TILED_BYTES * vae_scale),
    )


def _pin(buffer: torch.Tensor) -> bool:
    """Page-lock `buffer` in place with cudaHostRegister: exact size, unlike `pin_memory()` whose
    allocator rounds every block up to a power of two."""
    if buffer.numel() == 0:
        return True
    err = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
    return int(err) == 0 if not hasattr(err, "value") else int(err.value) == 0


@dataclass
class StreamStats:
    copies: int = 0
    bytes_copied: int = 0
    waits: int = 0
    loads_on_demand: int = 0  # a unit was not prefetched (first step, or an interrupted forward)
    log: list[int] = field(default_factory=list)


def _make_hook(streamer: BlockStreamer, index: int, first: bool, last: bool) -> Any:
    from diffusers.hooks import ModelHook

    class UnitHook(ModelHook):
        _is_stateful = False

        def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if first:
                streamer.before(index)
            return args, kwargs

        def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
            if last:
                streamer.after(index)
            return output

    return UnitHook()


class BlockStreamer:
    """Applies a `MemoryPlan` to a FLUX.2 DiT whose tensors are on the CPU (e.g. loaded from disk).

    After construction the DiT's tensors live in: one device buffer (always-resident layers and resident
    units), `plan.num_slots` device slots (streamed units, each permanently viewing slot i mod K), and one
    host buffer (the streamed units' bytes, pinned). `before(i)`/`after(i)` run from hooks.
    """

    def __init__(self, transformer: torch.nn.Module, plan: MemoryPlan, device: torch.device | str):
        self.device = torch.device(device)
        self.plan = plan
        self.stats = StreamStats()
        cuda = self.device.type == "cuda"
        atoms = {name: m for name, _, m in _atoms_of(transformer)}
        if not cuda:
            _prepack_for_cpu([transformer])
        atom_ids = {id(sub) for m in atoms.values() for sub in m.modules()}
        other_modules = [m for m in transformer.modules() if id(m) not in atom_ids]

        # Resident: the top-level layers and resident units, one device buffer.
        resident_refs = _tensor_refs(other_modules, recurse=False)
        for unit in plan.units:
            if unit.resident:
                resident_refs += _tensor_refs([atoms[a] for a in unit.atoms])
        self.resident_buffer = torch.empty(_layout(resident_refs), dtype=torch.uint8, device=self.device)
        for ref in resident_refs:
            view = _view(self.resident_buffer, ref)
            view.copy_(ref.tensor)
            ref.point_to(view)

        # Streamed: a host slab per unit inside one host buffer, device views into rotating slots.
        streamed = [u for u in plan.units if not u.resident]
        unit_refs = [_tensor_refs([atoms[a] for a in u.atoms]) for u in streamed]
        sizes = [_layout(refs) for refs in unit_refs]
        self.slot_bytes = max(sizes, default=0)
        self.num_slots = plan.num_slots if streamed else 0
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
            slot = self.slots[i % self.num_slots]
            for ref in refs:
                _view(host, ref).copy_(ref.tensor)  # the original (CPU or GPU) copy is dropped below
                ref.point_to(_view(slot, ref))
        self.pinned = False
        if cuda and self.host_buffer.numel():
            self.pinned = _pin(self.host_buffer)
        self.num_units = len(streamed)
        self.loaded: list[int | None] = [None] * self.num_slots
        if cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self.ready = [torch.cuda.Event() for _ in range(self.num_slots)]
            self.free = [torch.cuda.Event() for _ in range(self.num_slots)]

        # Hooks on the first and last part of each streamed unit.
        from diffusers.hooks import HookRegistry

        self._hooked: list[torch.nn.Module] = []
        for i, unit in enumerate(streamed):
            for j, atom in enumerate(unit.atoms):
                registry = HookRegistry.check_if_exists_or_initialize(atoms[atom])
                registry.register_hook(_make_hook(self, i, j == 0, j == len(unit.atoms) - 1), HOOK_NAME)
                self._hooked.append(atoms[atom])

    # -- runtime -----------------------------------------------------------------------------------

    def _load(self, index: int) -> None:
        slot = index % self.num_slots
        n = self.host_units[index].numel()
        self.stats.copies += 1
        self.stats.bytes_copied += n
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
        if self.loaded[slot] != index:
            self.stats.loads_on_demand += 1
            self._load(index)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
        self.stats.log.append(index)
        # Prefetch the next K-1 units (cyclically: the last unit of a step prefetches the first of the next).
        for ahead in range(1, self.num_slots):
            nxt = (index + ahead) % self.num_units
            if self.loaded[nxt % self.num_slots] != nxt:
                self._load(nxt)

    def after(self, index: int) -> None:
        if self.device.type == "cuda":
            self.free[index % self.num_slots].record(torch.cuda.current_stream(self.device))

    def remove(self) -> None:
        """Remove the hooks and unpin the host buffer (the DiT is unusable afterwards)."""
        from diffusers.hooks import HookRegistry

        for module in self._hooked:
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(HOOK_NAME, recurse=False)
        self._hooked.clear()
        if self.pinned:
            torch.cuda.synchronize(self.device)
            torch.cuda.cudart().cudaHostUnregister(self.host_buffer.data_ptr())
            self.pinned = False


# --- budget and allocator --------------------------------------------------------------------------


def host_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def auto_vram_bytes(device: torch.device) -> int:
    """What the card can give this process now: free memory as the driver reports it, plus what the
    process already holds (its CUDA context counts against the budget too), minus 2% slack."""
    free, _total = torch.cuda.mem_get_info(device)
    return int(free * 0.98) + torch.cuda.memory_reserved(device)


def configure_allocator(plan: MemoryPlan, device: torch.device) -> None:
    """Keep the caching allocator inside the plan: cap it with set_per_process_memory_fraction and use
    expandable segments, so freed blocks do not strand memory between fixed-size segments (the 4 GiB
    out-of-memory of the diffusers recipe)."""
    if device.type != "cuda":
        return
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if plan.expandable_segments and "expandable_segments" not in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        # Takes effect for segments created from now on; the CLI also sets the environment variable
        # before CUDA starts.
        setter = getattr(torch.cuda.memory, "_set_allocator_settings", None)
        if setter is not None:
            setter("expandable_segments:True")
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, plan.allocator_limit / total), device)


def configure_vae(vae: Any, plan: MemoryPlan) -> None:
    """Tile the VAE as planned. `enable_tiling()` alone keeps the tile at sample_size (1024 px for
    FLUX.2), so a 1024 px image would still decode in one piece: set the tile size too."""
    if plan.vae_tiled:
        vae.enable_tiling()
        vae.tile_sample_min_size = plan.vae_tile_px
        vae.tile_latent_min_size = plan.vae_tile_px // 8
    else:
        vae.disable_tiling()


def plan_for(
    transformer: Any,
    vae: Any,
    workload: Workload,
    device: torch.device,
    vram: int | None = None,
    num_slots: int = 2,
    overhead: int | None = None,
) -> MemoryPlan:
    """Plan for a loaded DiT: `vram` None means auto (free memory now) on CUDA."""
    if vram is None:
        if device.type != "cuda":
            raise ValueError("vram: a budget in bytes is needed on a CPU device (there is no free memory to ask)")
        vram = auto_vram_bytes(device)
    kwargs: dict[str, Any] = {"device_type": device.type, "host_available": host_available_bytes()}
    if overhead is not None:
        kwargs["overhead"] = overhead
    return plan_memory(spec_from_module(transformer, vae), workload, Budget(vram=vram, **kwargs), num_slots=num_slots)
