"""Memory planner for the FLUX.2 DiT on a small GPU: pure decisions, no torch.

Given what the card may hold (a VRAM budget counting everything the process holds on it, as NVML
reports it), the host RAM, and the workload (resolution, reference images, batch), `plan_memory`
decides:

- which transformer blocks stay resident on the GPU and which stream from pinned host memory,
- the transfer unit (a whole block, or for tight budgets a block's attention / feed-forward part) —
  one host->GPU copy per unit, never one per Linear,
- how many device slots the streamed units rotate through (double buffering: the next unit is copied
  on a side stream while the current one computes),
- how much the caching allocator may take (`set_per_process_memory_fraction`) and whether the VAE
  decodes in 512 px tiles.

Everything here is arithmetic on byte counts, so the decisions are unit-testable on a CPU. The byte
counts come either from a loaded model (`flux2_client.offload.spec_from_module`) or, before anything
is loaded, from the model config (`spec_from_config`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

GiB = 1 << 30
MiB = 1 << 20

# Every tensor of a streamed unit starts at a multiple of this inside its slab, so views of any dtype
# are aligned (CUDA copies and kernels like 256-byte alignment).
TENSOR_ALIGN = 256

# What the process holds on the card outside the caching allocator: CUDA context, cuBLAS/cuDNN
# workspaces, kernels: ~0.8 GiB on an H100, torch 2.11 (docs/design.md#gpu-memory-and-bandwidth). The default leaves a
# margin. The benchmark measures it and can pass the measured value.
DEFAULT_CUDA_OVERHEAD = 1 * GiB

# Host memory of the client process itself (Python, torch, diffusers, the CUDA runtime) with no model
# tensor in it: RSS 1.7 GiB with the whole NF4 DiT on the card, H100 (docs/benchmarks.md, low-VRAM table).
HOST_PROCESS_BYTES = int(1.7 * GiB)

OFFLOAD_CHOICES = ("plan", "leaf_level", "none")
MAX_REFERENCE_IMAGES = 10  # what Flux2Pipeline (FLUX.2-dev) is documented to take

# Text tokens the FLUX.2-dev DiT always sees (the encoder pads to 512).
TEXT_TOKENS = 512

# The VAE decode at 1024x1024 (FLUX.2 VAE, bf16): 4.4 GiB reserved untiled, 1.3 GiB in 512 px tiles
# (docs/design.md#vae-tiling). Untiled memory grows with the pixel count; tiled memory with the tile.
VAE_UNTILED_BYTES_PER_MPIXEL = int(4.4 * GiB)
VAE_TILED_BYTES = int(1.3 * GiB)
VAE_TILE_PX = 512


class PlanError(ValueError):
    """The budget cannot hold even the smallest plan; the message says what is needed."""


def parse_size(text: str | int | float) -> int:
    """'8GB', '8GiB', '7.5G', '6000MB', '8' (GiB) -> bytes. GB and GiB both mean 2**30 here: card
    makers' "8 GB" cards hold 8 GiB."""
    if isinstance(text, int | float):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"size: expected a number with an optional unit like 8GB or 6000MB, got {text!r}")
    value = float(match.group(1))
    unit = match.group(2).upper() or "G"
    return int(value * {"K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}[unit])


def fmt_bytes(n: float) -> str:
    if abs(n) >= 0.5 * GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.0f} MiB" if abs(n) >= MiB else f"{n / 1024:.0f} KiB"


@dataclass(frozen=True)
class Atom:
    """The smallest transfer unit: one submodule of a transformer block (`transformer_blocks.3.ff`) or a
    whole single-stream block's attention. `block` names the block it belongs to."""

    name: str
    block: str
    nbytes: int


@dataclass(frozen=True)
class ModelSpec:
    """Byte counts of a FLUX.2 DiT, in execution order, plus the shapes activations depend on."""

    atoms: tuple[Atom, ...]
    other_bytes: int  # embedders, modulation, norm_out, proj_out: always resident
    hidden: int  # D = heads x head_dim
    mlp_hidden: int  # F
    largest_dequantized_bytes: int  # biggest bf16 weight bitsandbytes materialises in a forward
    vae_bytes: int = 0
    adapter_bytes: int = 0  # LoRA weights: resident beside the embedders while base blocks stream
    adapter_out_features: int = 0  # widest Linear output that carries a LoRA (0: none)
    # Biggest single tensor as loaded (the packed NF4 weight of that Linear): the one in flight while the
    # block streamer copies tensors to their buffers; 0 = derive it from largest_dequantized_bytes.
    largest_tensor_bytes: int = 0
    # VAE decode memory; the defaults are the FLUX.2 VAE's, a narrower VAE scales them down.
    vae_untiled_bytes_per_mpixel: int = VAE_UNTILED_BYTES_PER_MPIXEL
    vae_tiled_bytes: int = VAE_TILED_BYTES

    @property
    def block_bytes(self) -> int:
        return sum(a.nbytes for a in self.atoms)

    @property
    def loaded_bytes(self) -> int:
        """The DiT as loaded into host memory, before any plan: every block and the other layers."""
        return self.block_bytes + self.other_bytes

    @property
    def largest_tensor(self) -> int:
        # A packed NF4 weight is half a byte per value, its dequantised bf16 copy two bytes.
        return self.largest_tensor_bytes or self.largest_dequantized_bytes // 4

    def blocks(self) -> list[list[Atom]]:
        out: list[list[Atom]] = []
        for atom in self.atoms:
            if out and out[-1][0].block == atom.block:
                out[-1].append(atom)
            else:
                out.append([atom])
        return out


@dataclass(frozen=True)
class Workload:
    """What one pipeline call computes: output size, reference images (their (width, height) after the
    pipeline's resize to at most 1024x1024 pixels) and images per call (prompts x images per prompt)."""

    height: int = 1024
    width: int = 1024
    reference_sizes: tuple[tuple[int, int], ...] = ()
    batch: int = 1

    @property
    def image_tokens(self) -> int:
        return (self.height // 16) * (self.width // 16)

    @property
    def reference_tokens(self) -> int:
        tokens = 0
        for w, h in self.reference_sizes:
            if w * h > 1024 * 1024:  # Flux2Pipeline resizes to 1024^2 area, then crops to multiples of 16
                scale = math.sqrt(1024 * 1024 / (w * h))
                w, h = int(w * scale), int(h * scale)
            tokens += (h // 16) * (w // 16)
        return tokens

    @property
    def tokens(self) -> int:
        return TEXT_TOKENS + self.image_tokens + self.reference_tokens


@dataclass(frozen=True)
class Budget:
    """`vram`: bytes the process may hold on the card in total (NVML's view); `overhead`: the part of
    it outside the caching allocator; `host_available`: host RAM that may be pinned."""

    vram: int
    host_available: int | None = None
    overhead: int = DEFAULT_CUDA_OVERHEAD
    device_type: str = "cuda"


@dataclass(frozen=True)
class Unit:
    """One host->device transfer (or one resident group): consecutive atoms."""

    atoms: tuple[str, ...]
    nbytes: int
    resident: bool


@dataclass(frozen=True)
class MemoryPlan:
    mode: str  # "resident" (all on the GPU) or "stream"
    units: tuple[Unit, ...]
    num_slots: int
    slot_bytes: int
    granularity: str  # "block" or "part"
    allocator_limit: int  # bytes the caching allocator may hold (set_per_process_memory_fraction)
    expandable_segments: bool
    activation_bytes: int
    vae_tiled: bool
    vae_tile_px: int
    vae_decode_bytes: int
    host_pinned_bytes: int
    host_load_peak_bytes: int  # host RAM at its peak while loading, the process itself included
    host_steady_bytes: int  # host RAM once loaded (pinned buffer + the process; on a CPU device everything)
    budget: Budget
    workload: Workload
    spec_other_bytes: int
    spec_loaded_bytes: int = 0
    notes: tuple[str, ...] = field(default=())
    spec_adapter_bytes: int = 0

    @property
    def resident_bytes(self) -> int:
        return self.spec_other_bytes + self.spec_adapter_bytes + sum(u.nbytes for u in self.units if u.resident)

    @property
    def streamed_units(self) -> list[Unit]:
        return [u for u in self.units if not u.resident]

    @property
    def device_weight_bytes(self) -> int:
        return self.resident_bytes + self.num_slots * self.slot_bytes

    def describe(self) -> str:
        b, w = self.budget, self.workload
        streamed = self.streamed_units
        lines = [
            "memory plan",
            f"  budget          {fmt_bytes(b.vram)} on the card ({fmt_bytes(b.vram - self.allocator_limit)} "
            "outside the allocator: CUDA context, workspaces)",
            f"  workload        {w.width}x{w.height}, {len(w.reference_sizes)} reference image(s), batch {w.batch}: "
            f"{w.tokens} tokens",
            f"  allocator cap   {fmt_bytes(self.allocator_limit)} (set_per_process_memory_fraction), "
            f"expandable_segments={'on' if self.expandable_segments else 'off'}",
            f"  activations     {fmt_bytes(self.activation_bytes)} estimated peak in a DiT block",
            f"  resident        {fmt_bytes(self.resident_bytes)}: embedders/modulation/norm_out "
            f"({fmt_bytes(self.spec_other_bytes)}) + {sum(1 for u in self.units if u.resident)} of "
            f"{len(self.units)} units",
        ]
        if self.spec_adapter_bytes:
            lines.append(f"  LoRA adapters   {fmt_bytes(self.spec_adapter_bytes)} resident")
        if self.mode == "stream":
            lines += [
                f"  streamed        {len(streamed)} units ({self.granularity} granularity), "
                f"{fmt_bytes(sum(u.nbytes for u in streamed))} per step from pinned host memory "
                f"through {self.num_slots} slots of {fmt_bytes(self.slot_bytes)}, prefetched on a side stream",
                f"  host pinned     {fmt_bytes(self.host_pinned_bytes)} in one registered buffer "
                "(exact size, no per-tensor rounding)",
            ]
        else:
            lines.append("  streamed        nothing: the whole DiT fits")
        lines += [
            f"  host RAM        peak {fmt_bytes(self.host_load_peak_bytes)} while loading, "
            f"{fmt_bytes(self.host_steady_bytes)} after (estimates, each with ~{fmt_bytes(HOST_PROCESS_BYTES)} "
            "for the process itself)",
            f"                  the DiT is read whole ({fmt_bytes(self.spec_loaded_bytes)}), then copied into "
            "place one tensor at a time, each source let go",
        ]
        vae = f"tiled, {self.vae_tile_px} px tiles" if self.vae_tiled else "untiled"
        lines.append(f"  VAE             {vae} (~{fmt_bytes(self.vae_decode_bytes)} while decoding)")
        for unit in self.units:
            kind = "resident" if unit.resident else "stream  "
            lines.append(f"    {kind} {fmt_bytes(unit.nbytes):>10}  {', '.join(unit.atoms)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "granularity": self.granularity,
            "num_units": len(self.units),
            "resident_units": sum(1 for u in self.units if u.resident),
            "num_slots": self.num_slots,
            "slot_bytes": self.slot_bytes,
            "resident_bytes": self.resident_bytes,
            "adapter_bytes": self.spec_adapter_bytes,
            "allocator_limit": self.allocator_limit,
            "activation_bytes": self.activation_bytes,
            "vae_tiled": self.vae_tiled,
            "host_pinned_bytes": self.host_pinned_bytes,
            "host_load_peak_bytes": self.host_load_peak_bytes,
            "host_steady_bytes": self.host_steady_bytes,
        }


# --- byte counts -----------------------------------------------------------------------------------


def align_bytes(n: int) -> int:
    """`n` rounded up to `TENSOR_ALIGN`: the room a tensor of n bytes takes in a slab."""
    return (n + TENSOR_ALIGN - 1) // TENSOR_ALIGN * TENSOR_ALIGN


def nf4_linear_bytes(in_features: int, out_features: int, double_quant: bool = False, blocksize: int = 64) -> int:
    """Device bytes of one bitsandbytes NF4 Linear (packed weight + quant_state tensors), slab-aligned."""
    n = in_features * out_features
    blocks = math.ceil(n / blocksize)
    total = align_bytes(n // 2) + align_bytes(16 * 4)  # packed 4-bit weight, 16-entry NF4 code (fp32)
    if double_quant:
        total += align_bytes(blocks) + align_bytes(math.ceil(blocks / 256) * 4) + align_bytes(256 * 4) + align_bytes(4)
    else:
        total += align_bytes(blocks * 4)
    return total


def spec_from_config(config: Mapping[str, Any], double_quant: bool = False, vae_bytes: int = 0) -> ModelSpec:
    """A `ModelSpec` from a `Flux2Transformer2DModel` config (FLUX.2-dev or [klein]), assuming every
    Linear is NF4 (as in diffusers/FLUX.2-dev-bnb-4bit) and bf16 norm scales."""
    heads, head_dim = config.get("num_attention_heads", 48), config.get("attention_head_dim", 128)
    d = heads * head_dim
    f = int(d * config.get("mlp_ratio", 3.0))
    joint = config.get("joint_attention_dim", 15360)
    in_ch = config.get("in_channels", 128)
    t_ch = config.get("timestep_guidance_channels", 256)

    def lin(i: int, o: int) -> int:
        return nf4_linear_bytes(i, o, double_quant)

    norm = align_bytes(head_dim * 2)
    atoms: list[Atom] = []
    for i in range(config.get("num_layers", 8)):
        block = f"transformer_blocks.{i}"
        atoms.append(Atom(f"{block}.attn", block, 8 * lin(d, d) + 4 * norm))
        atoms.append(Atom(f"{block}.ff", block, lin(d, 2 * f) + lin(f, d)))
        atoms.append(Atom(f"{block}.ff_context", block, lin(d, 2 * f) + lin(f, d)))
    for i in range(config.get("num_single_layers", 48)):
        block = f"single_transformer_blocks.{i}"
        atoms.append(Atom(f"{block}.attn", block, lin(d, 3 * d + 2 * f) + lin(d + f, d) + 2 * norm))
    # Timestep embedder, plus FLUX.2-dev's guidance embedder (FLUX.2 [klein] DiTs have none).
    embedders = 2 if config.get("guidance_embeds", True) else 1
    other = (
        lin(in_ch, d)
        + lin(joint, d)
        + embedders * (lin(t_ch, d) + lin(d, d))
        + 2 * lin(d, 6 * d)
        + lin(d, 3 * d)
        + lin(d, 2 * d)
        + lin(d, in_ch)
    )
    return ModelSpec(
        atoms=tuple(atoms),
        other_bytes=other,
        hidden=d,
        mlp_hidden=f,
        largest_dequantized_bytes=d * (3 * d + 2 * f) * 2,
        vae_bytes=vae_bytes,
    )


def activation_bytes(spec: ModelSpec, workload: Workload) -> int:
    """Peak transient memory of one DiT block for `workload`.

    In a single-stream block bitsandbytes first dequantises the fused qkv+mlp weight (bf16, D x (3D+2F))
    while the matmul writes T x (3D+2F) beside the block's input, residual and normed copy (3D); later q/k
    are normalised and rotated, attention writes T x D, the SwiGLU and the concat with the attention
    output write ~3 x T x F while the (D+F) x D output weight is dequantised. The peak is the larger of
    the two moments. Checked against the H100 runs recorded in docs/benchmarks.md.
    """
    d, f = spec.hidden, spec.mlp_hidden
    tokens = workload.batch * workload.tokens
    fused = spec.largest_dequantized_bytes + tokens * (3 * d + 2 * f + 3 * d) * 2
    after_attention = (d + f) * d * 2 + tokens * (3 * d + 2 * f + 4 * d + 3 * f + 3 * d) * 2
    # A Linear with a LoRA (peft) holds its base output, the scaled adapter output and their sum at once,
    # beside the block's input, residual and normed copy.
    lora = tokens * (3 * spec.adapter_out_features + 3 * d) * 2 if spec.adapter_out_features else 0
    return max(fused, after_attention, lora)


def vae_decode_bytes(spec: ModelSpec, workload: Workload, tiled: bool) -> int:
    mpix = workload.height * workload.width / (1024 * 1024)
    untiled = int(spec.vae_untiled_bytes_per_mpixel * mpix * workload.batch)
    # A tile is at most 512x512: below that size tiling changes nothing.
    return min(untiled, spec.vae_tiled_bytes * workload.batch) if tiled else untiled


def host_memory(spec: ModelSpec, budget: Budget, *, slots: int, pinned: int) -> dict[str, int]:
    """Host RAM of a plan, the process itself included: `host_load_peak_bytes` and `host_steady_bytes`.

    The DiT is first loaded whole into host memory (`spec.loaded_bytes`), then the VAE; the VAE moves to
    the card before the block streamer starts, which copies one tensor at a time to the device buffer or
    the pinned host buffer and lets each source go (`BlockStreamer`), so the peak is the larger of DiT +
    VAE and DiT + the tensor in flight. On a CPU device the "device" side (resident buffer, slots, VAE)
    is host memory as well.
    """
    loaded = spec.loaded_bytes
    if budget.device_type == "cuda":
        peak, steady = loaded + max(spec.vae_bytes, spec.largest_tensor), pinned
    else:
        steady = loaded + spec.vae_bytes + slots  # resident buffer + host buffer hold the DiT once
        peak = steady + spec.largest_tensor
    return {"host_load_peak_bytes": peak + HOST_PROCESS_BYTES, "host_steady_bytes": steady + HOST_PROCESS_BYTES}


# --- the plan ---------------------------------------------------------------------------------------


def _group_units(spec: ModelSpec, granularity: str) -> list[tuple[tuple[str, ...], int]]:
    """Transfer units in execution order. "block": a whole block per copy, and small blocks (the
    single-stream ones are half a double block) paired so all units are about the same size, since every
    slot must hold the largest unit. "part": one copy per atom (attention / feed-forward)."""
    if granularity == "part":
        return [((a.name,), a.nbytes) for a in spec.atoms]
    blocks = [(tuple(a.name for a in blk), sum(a.nbytes for a in blk)) for blk in spec.blocks()]
    largest = max(n for _, n in blocks)
    units: list[tuple[tuple[str, ...], int]] = []
    for names, nbytes in blocks:
        if units and units[-1][1] + nbytes <= largest and not _is_double(names) and not _is_double(units[-1][0]):
            units[-1] = (units[-1][0] + names, units[-1][1] + nbytes)
        else:
            units.append((names, nbytes))
    return units


def _is_double(names: Sequence[str]) -> bool:
    return names[0].startswith("transformer_blocks.")


def _spread(n: int, k: int) -> list[int]:
    """k indices out of range(n), spread evenly (resident units between streamed ones give the copy
    engine time to run ahead)."""
    if k <= 0:
        return []
    if k >= n:
        return list(range(n))
    return sorted({int((i + 0.5) * n / k) for i in range(k)})


def _choose_resident(grouped: Sequence[tuple[tuple[str, ...], int]], room: int, slots: int) -> set[int] | None:
    """Indices of the units to keep resident: as many as `room` holds, spread evenly, leaving a streamed
    count that is a positive multiple of `slots` (or nothing streamed at all). None if impossible."""
    n = len(grouped)
    sizes = sorted(nb for _, nb in grouped)
    k, used = 0, 0
    for nb in sizes:
        if used + nb > room:
            break
        used += nb
        k += 1
    k = min(k, n - slots)
    while k >= 0:
        if (n - k) % slots == 0:
            chosen = set(_spread(n, k))
            if sum(grouped[i][1] for i in chosen) <= room:
                return chosen
        k -= 1
    return None


def plan_memory(
    spec: ModelSpec,
    workload: Workload,
    budget: Budget,
    *,
    num_slots: int = 2,
    margin: float = 0.06,
) -> MemoryPlan:
    """Decide residency, streaming, allocator cap and VAE tiling for `workload` within `budget`.

    Order of decisions: (1) the allocator gets the budget minus what lives outside it; (2) fixed costs:
    always-resident layers, the VAE weights, a fragmentation margin; (3) the work area: the larger of the
    DiT's activation peak and the VAE decode (tiled only if untiled does not fit beside the weights);
    (4) if all blocks fit beside that, everything is resident; otherwise `num_slots` slots sized for the
    largest transfer unit, preferring whole-block units, falling back to per-part units, and as many
    units resident as the rest allows, spread evenly, keeping the number of streamed units a multiple of
    the slot count so slots rotate the same way every step.
    """
    if num_slots < 2:
        raise ValueError(f"num_slots: at least 2 are needed to overlap copy and compute, got {num_slots}")
    overhead = budget.overhead if budget.device_type == "cuda" else 0
    allocator_limit = budget.vram - overhead
    if allocator_limit <= 0:
        raise PlanError(f"vram budget {fmt_bytes(budget.vram)} is below the CUDA overhead {fmt_bytes(overhead)}")
    notes: list[str] = []
    act = activation_bytes(spec, workload)
    fixed = spec.other_bytes + spec.adapter_bytes + spec.vae_bytes + int(margin * allocator_limit)
    vae_untiled = vae_decode_bytes(spec, workload, tiled=False)
    vae_tiled_bytes = vae_decode_bytes(spec, workload, tiled=True)

    def work_area(tiled: bool) -> int:
        return max(act, vae_tiled_bytes if tiled else vae_untiled)

    free_untiled = allocator_limit - fixed - work_area(False)
    # Whole DiT resident?
    if free_untiled >= spec.block_bytes:
        units = tuple(Unit(names, n, True) for names, n in _group_units(spec, "block"))
        return MemoryPlan(
            mode="resident",
            units=units,
            num_slots=0,
            slot_bytes=0,
            granularity="block",
            allocator_limit=allocator_limit,
            expandable_segments=True,
            activation_bytes=act,
            vae_tiled=False,
            vae_tile_px=VAE_TILE_PX,
            vae_decode_bytes=vae_untiled,
            host_pinned_bytes=0,
            **host_memory(spec, budget, slots=0, pinned=0),
            budget=budget,
            workload=workload,
            spec_other_bytes=spec.other_bytes,
            spec_loaded_bytes=spec.loaded_bytes,
            notes=tuple(notes),
            spec_adapter_bytes=spec.adapter_bytes,
        )

    # Streaming. Tile the VAE when its untiled decode would take more than the DiT's work area: that
    # memory buys resident blocks, which matter for every step, while tiling costs ~0.1 s once.
    vae_tiled = vae_untiled > max(act, vae_tiled_bytes)
    work = work_area(vae_tiled)
    if vae_tiled:
        notes.append(
            f"VAE decodes in {VAE_TILE_PX} px tiles: untiled it would need {fmt_bytes(vae_untiled)}, "
            f"more than the DiT's {fmt_bytes(act)}"
        )
    available = allocator_limit - fixed - work
    chosen = None
    for granularity in ("block", "part"):
        grouped = _group_units(spec, granularity)
        slot_bytes = max(n for _, n in grouped)
        # Slots rotate statically (unit i always lands in slot i mod K), so the streamed count must be a
        # multiple of K; one extra slot is the fallback when no resident count makes it so.
        for slots in (num_slots, num_slots + 1):
            room = available - slots * slot_bytes
            if room < 0:
                continue
            resident_idx = _choose_resident(grouped, room, slots)
            if resident_idx is not None:
                chosen = (granularity, grouped, slot_bytes, slots, resident_idx)
                break
        if chosen is not None:
            break
    if chosen is None:
        part_slot = max(a.nbytes for a in spec.atoms)
        need = fixed + work + num_slots * part_slot + overhead
        raise PlanError(
            f"vram budget {fmt_bytes(budget.vram)} is too small for {workload.width}x{workload.height} with "
            f"{len(workload.reference_sizes)} reference image(s), batch {workload.batch}: the smallest plan needs "
            f"{fmt_bytes(need)} ({fmt_bytes(work)} activations/VAE, {num_slots} x {fmt_bytes(part_slot)} slots, "
            f"{fmt_bytes(spec.other_bytes + spec.adapter_bytes)} resident layers and LoRA adapters, "
            f"{fmt_bytes(overhead)} CUDA overhead)"
        )
    granularity, grouped, slot_bytes, num_slots, resident_idx = chosen
    if num_slots > 2:
        notes.append(f"{num_slots} slots: the streamed unit count needs it for a regular rotation")
    units = tuple(Unit(names, nb, i in resident_idx) for i, (names, nb) in enumerate(grouped))
    host = sum(u.nbytes for u in units if not u.resident)
    if budget.host_available is not None and host > budget.host_available:
        raise PlanError(
            f"host RAM: streaming needs {fmt_bytes(host)} pinned, only {fmt_bytes(budget.host_available)} available"
        )
    return MemoryPlan(
        mode="stream",
        units=units,
        num_slots=num_slots,
        slot_bytes=slot_bytes,
        granularity=granularity,
        allocator_limit=allocator_limit,
        expandable_segments=True,
        activation_bytes=act,
        vae_tiled=vae_tiled,
        vae_tile_px=VAE_TILE_PX,
        vae_decode_bytes=vae_tiled_bytes if vae_tiled else vae_untiled,
        host_pinned_bytes=host,
        **host_memory(spec, budget, slots=num_slots * slot_bytes, pinned=host),
        budget=budget,
        workload=workload,
        spec_other_bytes=spec.other_bytes,
        spec_loaded_bytes=spec.loaded_bytes,
        notes=tuple(notes),
        spec_adapter_bytes=spec.adapter_bytes,
    )
