"""Is the streamed real-size DiT bit-identical to the resident one on the GPU?

Builds the FLUX.2-dev NF4 DiT (random weights, seeded, as bench/lowvram.py does) three times in one
process: resident on the GPU, streamed by the planner (8 GiB plan), and diffusers' leaf_level recipe.
Runs one forward at 1024x1024 (4096 image + 512 text tokens) twice on each and compares the outputs.

    python bench/verify_streaming.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from lowvram import GiB, build_nf4_dit


def main() -> None:
    from flux2_client.generation import _move_quant_state
    from flux2_client.offload import BlockStreamer, plan_for
    from flux2_client.planner import Workload

    device = torch.device("cuda", 0)
    g = torch.Generator(device).manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 4096, 128, device=device, generator=g).to(torch.bfloat16),
        encoder_hidden_states=torch.randn(1, 512, 15360, device=device, generator=g).to(torch.bfloat16),
        timestep=torch.tensor([0.5], device=device),
        guidance=torch.tensor([4.0], device=device),
        img_ids=torch.zeros(1, 4096, 4, device=device),
        txt_ids=torch.zeros(1, 512, 4, device=device),
    )

    def forward(model) -> torch.Tensor:
        with torch.no_grad():
            return model(**inputs).sample.float().cpu()

    results: dict = {}
    resident = build_nf4_dit(torch, device).to(device)
    r1, r2 = forward(resident), forward(resident)
    del resident
    torch.cuda.empty_cache()
    results["resident_deterministic"] = torch.equal(r1, r2)
    results["finite_fraction"] = torch.isfinite(r1).float().mean().item()
    results["abs_mean"] = r1[torch.isfinite(r1)].abs().mean().item()

    streamed = build_nf4_dit(torch, device)
    plan = plan_for(streamed, None, Workload(1024, 1024), device, vram=8 * GiB)
    streamer = BlockStreamer(streamed, plan, device)
    s1, s2, s3 = forward(streamed), forward(streamed), forward(streamed)
    results["plan"] = plan.as_dict()
    results["streamed_equal_resident"] = [torch.equal(r1, s) for s in (s1, s2, s3)]
    results["streamed_deterministic"] = torch.equal(s1, s2) and torch.equal(s2, s3)
    results["streamed_max_abs_diff"] = max((r1 - s).abs().nan_to_num(0).max().item() for s in (s1, s2, s3))
    results["stream_copies"] = streamer.stats.copies
    streamer.remove()
    del streamed, streamer
    torch.cuda.empty_cache()

    leaf = build_nf4_dit(torch, device)
    _move_quant_state(leaf, device)
    leaf.enable_group_offload(
        onload_device=device, offload_device=torch.device("cpu"), offload_type="leaf_level", use_stream=True
    )
    l1, l2 = forward(leaf), forward(leaf)
    results["leaf_equal_resident"] = [torch.equal(r1, x) for x in (l1, l2)]
    results["leaf_max_abs_diff"] = max((r1 - x).abs().nan_to_num(0).max().item() for x in (l1, l2))
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
