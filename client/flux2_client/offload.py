"""The memory plan on a pipeline, the diffusers way: state in a named hook on the module.

`apply_memory_plan(pipe, plan, device)` carries out a `MemoryPlan` on a `Flux2Pipeline` whose DiT is in
host memory: it caps the caching allocator, moves and tiles the VAE, lays the DiT out in a resident device
buffer, rotating device slots and one page-locked host buffer (`BlockStreamer`), and registers a
`MemoryPlanHook` named `MEMORY_PLAN_HOOK` in the transformer's diffusers `HookRegistry`, as
`apply_group_offloading` registers its "group_offloading" hook. `get_memory_plan(pipe)` and
`get_block_streamer(pipe)` read that hook back; `remove_memory_plan(pipe)` removes it, with the
streamer's per-block hooks.

    plan = plan_for(pipe.transformer, pipe.vae, Workload(1024, 1024), device, vram=8 << 30)
    apply_memory_plan(pipe, plan, device)
    print(get_memory_plan(pipe).describe())

`apply_leaf_level_offloading` is diffusers' own recipe (group offloading at leaf level) made safe for
an NF4 DiT.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ._allocator import auto_vram_bytes, configure_allocator, host_available_bytes
from ._introspection import spec_from_module
from ._streamer import LOAD_MODES, STREAM_HOOK, BlockStreamer, StreamStats
from .planner import Budget, MemoryPlan, Workload, plan_memory
from .step_cache import skip_schedule

__all__ = [
    "LOAD_MODES",
    "MEMORY_PLAN_HOOK",
    "STREAM_HOOK",
    "BlockStreamer",
    "MemoryPlanHook",
    "StreamStats",
    "apply_block_streaming",
    "apply_leaf_level_offloading",
    "apply_memory_plan",
    "configure_vae",
    "get_block_streamer",
    "get_memory_plan",
    "plan_for",
    "remove_memory_plan",
    "spec_from_module",
]

MEMORY_PLAN_HOOK = "flux2_split_memory_plan"


class MemoryPlanHook(ModelHook):
    """Holds the plan and its streamer on the transformer. It changes no call: at the start of each forward it
    tells the streamer which blocks the step cache (if any) may skip. Removing it (through the registry or
    `remove_memory_plan`) unhooks the blocks and unpins the host buffer."""

    _is_stateful = False

    def __init__(self, plan: MemoryPlan, streamer: BlockStreamer):
        super().__init__()
        self.plan = plan
        self.streamer = streamer

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        self.streamer.begin_forward(skip_schedule(module))
        return args, kwargs

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:  # diffusers' spelling
        self.streamer.remove()
        return module


def _transformer_of(pipe_or_transformer: Any) -> torch.nn.Module:
    if isinstance(pipe_or_transformer, torch.nn.Module):
        return pipe_or_transformer
    transformer = getattr(pipe_or_transformer, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        raise TypeError(
            f"pipe_or_transformer: expected a pipeline with a transformer or the transformer itself, "
            f"got {type(pipe_or_transformer).__name__}"
        )
    return transformer


def _plan_hook(pipe_or_transformer: Any) -> MemoryPlanHook | None:
    registry = getattr(_transformer_of(pipe_or_transformer), "_diffusers_hook", None)
    hook = registry.get_hook(MEMORY_PLAN_HOOK) if isinstance(registry, HookRegistry) else None
    return hook if isinstance(hook, MemoryPlanHook) else None


def get_memory_plan(pipe_or_transformer: Any) -> MemoryPlan | None:
    """The `MemoryPlan` applied to the pipeline's transformer (or to this transformer); None when the
    DiT is not run by a plan (`offload="none"` or `"leaf_level"`)."""
    hook = _plan_hook(pipe_or_transformer)
    return hook.plan if hook is not None else None


def get_block_streamer(pipe_or_transformer: Any) -> BlockStreamer | None:
    """The `BlockStreamer` that carries out the plan (its `stats` count the copies); None without a plan."""
    hook = _plan_hook(pipe_or_transformer)
    return hook.streamer if hook is not None else None


def apply_block_streaming(
    transformer: torch.nn.Module,
    plan: MemoryPlan,
    device: torch.device | str,
    *,
    load_mode: str = "stream",
    progress: Callable[[int, int], None] | None = None,
) -> BlockStreamer:
    """Lay out `transformer` (tensors in host memory) as `plan` says and hook its blocks; the plan and
    the streamer are kept in the transformer's `MEMORY_PLAN_HOOK`. Each loaded tensor is let go as soon
    as it is copied (`load_mode`, `progress`: see `BlockStreamer`)."""
    if _plan_hook(transformer) is not None:
        raise ValueError("transformer: a memory plan is already applied; remove_memory_plan() first")
    streamer = BlockStreamer(transformer, plan, device, load_mode=load_mode, progress=progress)
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(
        MemoryPlanHook(plan, streamer), MEMORY_PLAN_HOOK
    )
    return streamer


def apply_memory_plan(
    pipe: Any,
    plan: MemoryPlan,
    device: torch.device | str,
    *,
    load_mode: str = "stream",
    progress: Callable[[int, int], None] | None = None,
) -> BlockStreamer:
    """Carry out `plan` on a `Flux2Pipeline` whose DiT is in host memory: allocator cap, VAE on `device`
    (tiled as planned), DiT resident buffer + streamed slots + hooks (`load_mode`, `progress`: see
    `BlockStreamer`)."""
    device = torch.device(device)
    configure_allocator(plan, device)
    pipe.vae.to(device)  # first: its host copy is gone before the DiT's host buffer fills
    streamer = apply_block_streaming(pipe.transformer, plan, device, load_mode=load_mode, progress=progress)
    configure_vae(pipe.vae, plan)
    return streamer


def remove_memory_plan(pipe_or_transformer: Any) -> None:
    """Remove the plan's hooks and unpin the host buffer. The DiT's streamed blocks then view slots
    nothing refills: it is unusable afterwards (load it again)."""
    transformer = _transformer_of(pipe_or_transformer)
    if _plan_hook(transformer) is not None:
        HookRegistry.check_if_exists_or_initialize(transformer).remove_hook(MEMORY_PLAN_HOOK, recurse=False)


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


def apply_leaf_level_offloading(
    transformer: torch.nn.Module, device: torch.device | str, *, low_cpu_mem_usage: bool = False
) -> None:
    """diffusers' group offloading at leaf level (with a side stream on CUDA) for an NF4 DiT;
    `low_cpu_mem_usage` is diffusers' own option (pin each group's host copy when it is used instead of
    all of them up front).

    bitsandbytes keeps NF4 scales in a QuantState beside each weight. Group offloading moves parameters,
    not that state, so it must already be on the execution device or the first forward reads host memory
    from a kernel (illegal memory access on CUDA; docs/design.md)."""
    device = torch.device(device)
    for module in transformer.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            state.to(device)
    transformer.enable_group_offload(  # type: ignore[operator]
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type="leaf_level",
        use_stream=device.type == "cuda",
        low_cpu_mem_usage=low_cpu_mem_usage,
    )
