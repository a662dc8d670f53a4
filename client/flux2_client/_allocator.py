"""What memory there is, and keeping the CUDA caching allocator inside a plan's budget."""

from __future__ import annotations

import os

import torch

from .planner import MemoryPlan


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
