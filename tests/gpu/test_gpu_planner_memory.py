"""The planner's estimates against memory measured on the card (skipped without CUDA).

For each budget, one process (`python -m bench.lowvram --worker`, the allocator capped before any
allocation) builds the real-size FLUX.2-dev NF4 DiT with random weights and the FLUX.2 VAE, applies the
plan, and generates a 1024 px image; the figures it measures are checked against the plan it printed:

- the whole process stayed within the budget on the card (context and workspaces included),
- the weights the plan put on the card are what the allocator really holds for them,
- the DiT's transient peak while denoising and the VAE decode's peak are within the planner's estimates,
  and not so far below that the estimate says nothing (at least 70% / 25% of it),
- what the process holds outside the caching allocator is within the planner's overhead allowance.

    python -m pytest -m gpu tests/gpu -q        # FLUX2_GPU_REPORT_DIR=dir keeps the figures as JSON
"""

from __future__ import annotations

import pytest
from _gpu_report import needs_cuda, write_gpu_report

pytestmark = needs_cuda("memory is measured on the card (run on an H100/H200)")

MiB = 1 << 20


@pytest.mark.parametrize("budget_gib", [4, 8])
def test_planner_estimates_hold_on_the_card_at_1024px(budget_gib, request):
    from bench.lowvram import run_config

    result = run_config("plan", budget_gib, refs=0, steps=2)
    write_gpu_report(request, {k: v for k, v in result.items() if k != "log"} | {"log": result.get("log", "")[-3000:]})
    assert result.get("ok"), result.get("error", "") + "\n" + result.get("log", "")[-3000:]
    plan = result["plan"]
    budget = budget_gib * (1 << 30)
    assert plan["budget"] == budget

    card_peak = max(result["card_peak_sampled"], result["card_peak_est"])
    assert card_peak <= budget, f"the process held {card_peak / MiB:.0f} MiB on the card, budget {budget / MiB:.0f}"
    assert result["peak_reserved"] <= plan["allocator_limit"]

    # Weights: the resident buffer and the slots, as planned (the allocator rounds each to 512 bytes).
    assert abs(result["weights_allocated_by_setup"] - plan["device_weight_bytes"]) <= 4096

    # Transient memory: the estimates are upper bounds that still describe the run.
    denoise, decode = result["denoise_transient_peak"], result["decode_transient_peak"]
    assert 0.7 * plan["activation_bytes"] <= denoise <= plan["activation_bytes"], (denoise, plan["activation_bytes"])
    assert 0.25 * plan["vae_decode_bytes"] <= decode <= plan["vae_decode_bytes"], (decode, plan["vae_decode_bytes"])

    # CUDA context, cuBLAS/cuDNN workspaces, kernels: outside the allocator, within the planner's allowance.
    assert result["outside_allocator_now"] <= plan["overhead"]


@pytest.mark.parametrize("budget_gib", [4, 8])
def test_host_ram_stays_within_the_dit_plus_2gib_when_loading_a_checkpoint(budget_gib, request, tmp_path_factory):
    """Issue 11: the CLI's path (pre-quantized DiT memory-mapped from disk, laid out by the streamer) never
    holds the DiT twice in host memory: peak RSS while loading and while generating stays within the
    packed weights + 2 GiB, and within the plan's own estimate. FLUX2_GPU_CHECKPOINT_DIR reuses a
    checkpoint written by an earlier run (`python -m bench.lowvram --checkpoint DIR`)."""
    import os
    from pathlib import Path

    from bench.lowvram import run_config, save_checkpoint

    folder = Path(os.environ.get("FLUX2_GPU_CHECKPOINT_DIR") or tmp_path_factory.getbasetemp() / "nf4-dit")
    if not (folder / "transformer" / "config.json").is_file():
        save_checkpoint(folder)
    result = run_config("plan", budget_gib, refs=0, steps=2, checkpoint=folder)
    write_gpu_report(request, {k: v for k, v in result.items() if k != "log"} | {"log": result.get("log", "")[-3000:]})
    assert result.get("ok"), result.get("error", "") + "\n" + result.get("log", "")[-3000:]
    limit = result["dit_bytes"] + 2 * (1 << 30)
    assert result["rss_peak_load"] <= limit, (result["rss_peak_load"] / MiB, limit / MiB)
    assert result["rss_peak_generation"] <= limit, (result["rss_peak_generation"] / MiB, limit / MiB)
    assert result["rss_peak_load"] <= result["plan"]["host_load_peak_bytes"]
