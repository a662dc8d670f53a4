"""GPU check of the planner path on tiny models loaded from disk (pre-quantised NF4 DiT, so the
quant_state trap applies): a budget just above the CUDA overhead forces streaming through the side
stream; the images must equal the same pipeline with everything resident, bit for bit.

    python bench/gpu_smoke.py /tmp/tiny
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from flux2_client._quantization import load_nf4_transformer
from flux2_client.generation import GenerationParams, generate, load_pipeline
from flux2_client.offload import BlockStreamer, spec_from_module
from flux2_client.planner import (
    DEFAULT_CUDA_OVERHEAD,
    Budget,
    Workload,
    _group_units,
    activation_bytes,
    plan_memory,
    vae_decode_bytes,
)
from flux2_client.tiny import make_tiny_flux2


def main(workdir: str) -> None:
    paths = make_tiny_flux2(workdir)
    embeds = torch.randn(2, 512, 192, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    rng = np.random.default_rng(0)
    from PIL import Image

    refs = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    params = GenerationParams(64, 64, 3, 4.0, seed=1)
    workload = Workload(64, 64, reference_sizes=((64, 64),) * 2, batch=2)
    plain = load_pipeline(str(paths.pipeline), dit=str(paths.nf4_repo), device="cuda", offload="none")
    expected = [np.asarray(im) for im in generate(plain, embeds, params, images=refs, progress=False)]
    del plain
    # The API path on CUDA (the tiny DiT fits: resident plan).
    api = load_pipeline(str(paths.pipeline), dit=str(paths.nf4_repo), device="cuda", vram="8GB", workload=workload)
    api_same = all(
        np.array_equal(a, np.asarray(b))
        for a, b in zip(expected, generate(api, embeds, params, images=refs, progress=False), strict=True)
    )
    print(f"gpu smoke: load_pipeline(vram=8GB) mode={api.memory_plan.mode} identical_to_plain={api_same}")
    del api
    # Streaming: a tiny DiT only streams under a budget of a few MiB, too small for cuBLAS' workspace, so
    # plan for 2.5 blocks of room and leave the allocator uncapped. Same loader, same streamer.
    transformer = load_nf4_transformer(str(paths.nf4_repo), device="cpu")
    pipe = load_pipeline(str(paths.pipeline), dit=str(paths.nf4_repo), device="cuda", offload="none")
    pipe.transformer = transformer
    pipe.register_modules(transformer=transformer)
    spec = spec_from_module(transformer, pipe.vae)
    work = max(activation_bytes(spec, workload), vae_decode_bytes(spec, workload, tiled=False))
    block = max(n for _, n in _group_units(spec, "block"))
    budget = Budget(vram=DEFAULT_CUDA_OVERHEAD + int((spec.other_bytes + spec.vae_bytes + work + 2.5 * block) / 0.94))
    plan = plan_memory(spec, workload, budget)
    print(plan.describe())
    pipe.block_streamer = BlockStreamer(transformer, plan, torch.device("cuda", 0))
    pipe.memory_plan = plan
    streamer = pipe.block_streamer
    got = [np.asarray(im) for im in generate(pipe, embeds, params, images=refs, progress=False)]
    same = all(np.array_equal(a, b) for a, b in zip(expected, got, strict=True))
    print(
        f"gpu smoke: mode={pipe.memory_plan.mode} streamed_units={streamer.num_units} copies={streamer.stats.copies} "
        f"pinned={streamer.pinned} identical_to_resident={same}"
    )
    if not (same and api_same):
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny")
