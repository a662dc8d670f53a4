"""LoRAs, Turbo and step caches on the low-VRAM client, on a GPU, beside diffusers in the same run.

At real FLUX.2-dev shapes (8 double + 48 single blocks, random seeded NF4 weights from
`bench._models.build_nf4_dit`, built once in host memory and copied for each configuration), 1024x1024,
batch 1, random rank-16 and rank-64 LoRAs (bf16, loaded from `.safetensors` files) on two target sets:

- `trainer`: `train_dreambooth_lora_flux2.py`'s default `to_k,to_q,to_v,to_out.0` (the double blocks' attention),
- `all`: the 128 attention/MLP projections `to_q,to_k,to_v,to_out.0` (double blocks) and
  `attn.to_qkv_mlp_proj`, `attn.to_out` (single blocks),

it measures s/step (median of 3 timed calls of 4 steps, each after one warm-up call; CUDA synchronised at
every step end) for diffusers' resident NF4 pipeline with the LoRA loaded by `load_lora_weights`, and for the
streamed client (`load_loras`, then the planner at `--vram`, default 8 GiB) with the same file. Then, on the
streamed client with the rank-16 LoRA on all targets: seconds per image (1024 px, VAE decode included) for
50 steps (a 4-step call timed whole, plus 46 x the measured s/step: extrapolated, and labelled so), 8 Turbo
steps (`turbo_params`, timed whole; a random LoRA stands in for the Turbo LoRA, which is not downloaded) and
50 steps with each working step cache (timed whole), with the copies the streamer made per step.

    python -m bench.lora_speed --out lora_speed.json      # an H200: about 5 minutes
    python -m bench.lora_speed --tiny --out smoke.json    # the same code on the CPU, tiny shapes, 64 px

Memory: "card peak" is the larger of what nvidia-smi reports for this process (sampled every 0.2 s) and the
CUDA context + peak reserved memory; the budget covers everything on the card (bench/lowvram.py's convention).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

GiB = 1 << 30
TRAINER_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
SINGLE_TARGETS = ("attn.to_qkv_mlp_proj", "attn.to_out")
# (rank, target set); the last one's streamed pipeline stays up for the per-image timings.
VARIANTS = {
    "none": None,
    "r16-trainer": (16, "trainer"),
    "r64-trainer": (64, "trainer"),
    "r64-all": (64, "all"),
    "r16-all": (16, "all"),
}
IMAGE_LORA = "r16-all"


def lora_targets(transformer: torch.nn.Module, target_set: str) -> list[tuple[str, int, int]]:
    """(module name, in_features, out_features) of the LoRA targets, as diffusers names the modules."""
    out = []
    for name, module in transformer.named_modules():
        double = name.startswith("transformer_blocks.") and name.endswith(TRAINER_TARGETS)
        single = target_set == "all" and name.startswith("single_transformer_blocks.") and name.endswith(SINGLE_TARGETS)
        if (double or single) and hasattr(module, "in_features"):
            out.append((name, module.in_features, module.out_features))
    return out


def write_random_lora(path: Path, targets: list[tuple[str, int, int]], rank: int, seed: int) -> Path:
    """A diffusers-format LoRA file (alpha = rank: scaling 1) with random bf16 A and B."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, fan_in, fan_out in targets:
        a = torch.randn(rank, fan_in, generator=gen) * fan_in**-0.5
        b = torch.randn(fan_out, rank, generator=gen) * 0.01
        tensors[f"transformer.{name}.lora_A.weight"] = a.to(torch.bfloat16)
        tensors[f"transformer.{name}.lora_B.weight"] = b.to(torch.bfloat16)
    save_file(tensors, str(path))
    return path


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(call: Any, steps: int, device: torch.device) -> float:
    """s/step of one call of `steps` steps: time between the first and the last step's end."""
    marks: list[float] = []

    def on_step(_pipe: Any, _i: int, _t: Any, kw: dict) -> dict:
        _sync(device)
        marks.append(time.perf_counter())
        return kw

    call(steps, on_step)
    return (marks[-1] - marks[0]) / (steps - 1)


def s_per_step(call: Any, device: torch.device, runs: int, steps: int = 4) -> dict[str, Any]:
    call(1, None)  # warm-up: kernels, cuBLAS handles, first copies
    per_run = [timed_steps(call, steps, device) for _ in range(runs)]
    return {"s_per_step": statistics.median(per_run), "runs": per_run, "steps_per_run": steps}


def timed_call(call: Any, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    call()
    _sync(device)
    return time.perf_counter() - t0


def memory(device: torch.device, sampler: Any) -> dict[str, Any]:
    if device.type != "cuda":
        return {}
    from .lowvram import card_used

    reserved_now = torch.cuda.memory_reserved(device)
    outside = card_used(device.index or 0) - reserved_now
    peak_reserved = torch.cuda.max_memory_reserved(device)
    return {
        "peak_reserved": peak_reserved,
        "outside_allocator": outside,
        "card_peak": max(sampler.peak if sampler else 0, outside + peak_reserved),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("lora_speed.json"))
    parser.add_argument("--vram", default="8GB", help="the streamed client's budget for everything on the card")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU, 64 px: a smoke run of this code")
    parser.add_argument("--runs", type=int, default=3, help="timed calls per s/step figure (their median)")
    parser.add_argument("--image-steps", type=int, default=50, help="steps of the per-image timings")
    args = parser.parse_args(argv)
    # The planner asks for expandable segments (read once, when CUDA starts); diffusers' rows share the process.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from flux2_client._quantization import keep_canonical_nf4_layout
    from flux2_client.generation import GenerationParams, generate
    from flux2_client.lora import load_loras
    from flux2_client.offload import apply_memory_plan, get_block_streamer, plan_for, remove_memory_plan
    from flux2_client.planner import Workload, parse_size
    from flux2_client.tiny import FLUX2_SCHEDULER_CONFIG, build_tiny_transformer, build_tiny_vae
    from flux2_client.turbo import turbo_params

    from ._models import build_nf4_dit
    from .lowvram import CardSampler

    tiny = args.tiny or not torch.cuda.is_available()
    device = torch.device("cpu") if tiny else torch.device("cuda", torch.cuda.current_device())
    size = 64 if tiny else 1024
    width = 192 if tiny else 15360
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "size": size,
        "tiny": tiny,
    }
    t0 = time.perf_counter()
    config = {k: v for k, v in build_tiny_transformer(width).config.items() if not k.startswith("_")} if tiny else None
    pristine = build_nf4_dit(device, config=config)
    keep_canonical_nf4_layout(pristine)
    vae = (build_tiny_vae() if tiny else AutoencoderKLFlux2().to(torch.bfloat16).eval()).to(device)
    result["build_s"] = time.perf_counter() - t0
    embeds = torch.randn(1, 512, width, generator=torch.Generator().manual_seed(0)).to(device, torch.bfloat16)
    params = GenerationParams(height=size, width=size, num_inference_steps=4, guidance_scale=4.0, seed=0)

    def pipeline(transformer: Any) -> Any:
        scheduler = FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER_CONFIG)
        pipe = Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    tmp = tempfile.TemporaryDirectory()
    files: dict[str, Path] = {}
    for seed, (name, spec) in enumerate(VARIANTS.items()):
        if spec is not None:
            rank, target_set = spec
            targets = lora_targets(pristine, target_set)
            files[name] = write_random_lora(Path(tmp.name) / f"{name}.safetensors", targets, rank, seed)
            result.setdefault("lora_targets", {})[target_set] = len(targets)
    print(f"built in {result['build_s']:.0f} s; LoRA targets {result.get('lora_targets')}", flush=True)

    # diffusers' resident NF4 pipeline, each LoRA loaded by load_lora_weights and removed again.
    resident: dict[str, Any] = {}
    pipe = pipeline(copy.deepcopy(pristine).to(device))
    for name in VARIANTS:
        if name in files:
            pipe.load_lora_weights(str(files[name]), adapter_name=name)

        def call(steps: int, on_step: Any, pipe: Any = pipe) -> Any:
            return pipe(
                prompt_embeds=embeds,
                height=size,
                width=size,
                num_inference_steps=steps,
                guidance_scale=4.0,
                generator=torch.Generator("cpu").manual_seed(0),
                callback_on_step_end=on_step,
                output_type="latent",
            )

        resident[name] = s_per_step(call, device, args.runs)
        print(f"resident {name}: {resident[name]['s_per_step']:.3f} s/step", flush=True)
        if name in files:
            pipe.delete_adapters(name)
    result["resident"] = resident
    del pipe, call  # `call` holds the pipeline as a default argument: both go, or the card keeps the DiT
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    # The streamed client: the same LoRA file through load_loras, then the planner at --vram.
    budget = parse_size(args.vram)
    streamed: dict[str, Any] = {}
    sampler = None
    for name in VARIANTS:
        transformer = copy.deepcopy(pristine)
        pipe = pipeline(transformer)
        if name in files:
            load_loras(pipe, [(str(files[name]), 1.0)])
        if tiny:  # no card to ask: the fixed costs and 60% of the blocks
            budget = tiny_budget(transformer, vae)
        plan = plan_for(transformer, vae, Workload(size, size), device, vram=budget)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            sampler = CardSampler(device.index or 0)
            sampler.start()
        apply_memory_plan(pipe, plan, device)

        def ours(steps: int, on_step: Any, pipe: Any = pipe) -> Any:
            call_params = GenerationParams(size, size, steps, 4.0, seed=0)
            return generate(
                pipe, embeds, call_params, progress=False, callback_on_step_end=on_step, output_type="latent"
            )

        row = s_per_step(ours, device, args.runs)
        if sampler is not None:
            sampler.stop()
        row.update(
            memory(device, sampler),
            budget=plan.budget.vram,
            plan=plan.as_dict(),
            streamed_units=len(plan.streamed_units),
            vs_resident=row["s_per_step"] / resident[name]["s_per_step"],
        )
        streamed[name] = row
        print(f"streamed {name}: {row['s_per_step']:.3f} s/step ({row['vs_resident']:.3f}x resident)", flush=True)
        if name != IMAGE_LORA:
            remove_memory_plan(pipe)
            del pipe, transformer, ours  # `ours` holds the pipeline as a default argument
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result["streamed"] = streamed

    # Seconds per image on the streamed client with the rank-16 LoRA on all targets.
    images: dict[str, Any] = {}
    step = streamed[IMAGE_LORA]["s_per_step"]
    streamer = get_block_streamer(pipe)

    def image(call_params: GenerationParams) -> dict[str, Any]:
        streamer.stats = type(streamer.stats)()
        seconds = timed_call(lambda: generate(pipe, embeds, call_params, progress=False), device)
        copies = streamer.stats.copies_per_forward()
        return {"seconds": seconds, "steps": call_params.num_inference_steps, "copies_per_step": copies}

    n, short = args.image_steps, image(params)
    images[f"{n} steps (extrapolated)"] = {
        "seconds": short["seconds"] + (n - params.num_inference_steps) * step,
        "how": f"a {params.num_inference_steps}-step image timed whole + {n - params.num_inference_steps} x "
        f"{step:.3f} s/step",
        "measured_4_steps": short["seconds"],
    }
    images["turbo 8 steps"] = image(turbo_params(params))
    for cache in ("mag", "taylorseer"):
        images[f"turbo 8 steps + {cache}"] = image(dataclasses.replace(turbo_params(params), step_cache=cache))
        images[f"{n} steps + {cache}"] = image(dataclasses.replace(params, num_inference_steps=n, step_cache=cache))
    for label, row in images.items():
        print(f"image {label}: {row['seconds']:.2f} s", flush=True)
    result["images"] = {"lora": IMAGE_LORA, "vram": args.vram, **images}
    result["total_s"] = time.perf_counter() - t0
    args.out.write_text(json.dumps(result, indent=1))
    print(table(result))


def tiny_budget(transformer: Any, vae: Any) -> int:
    from flux2_client.offload import spec_from_module
    from flux2_client.planner import Workload, activation_bytes, vae_decode_bytes

    spec = spec_from_module(transformer, vae)
    work = max(activation_bytes(spec, Workload(64, 64)), vae_decode_bytes(spec, Workload(64, 64), tiled=False))
    fixed = spec.other_bytes + spec.adapter_bytes + spec.vae_bytes + work
    return int((fixed + 0.6 * spec.block_bytes) / 0.94)


def table(result: dict[str, Any]) -> str:
    rows = [
        "| LoRA | diffusers resident NF4 s/step | streamed client s/step | vs resident | card peak GiB |",
        "|---|---|---|---|---|",
    ]
    for name, row in result["streamed"].items():
        card = f"{row['card_peak'] / GiB:.2f}" if "card_peak" in row else "-"
        rows.append(
            f"| {name} | {result['resident'][name]['s_per_step']:.3f} | {row['s_per_step']:.3f} | "
            f"{row['vs_resident']:.3f} | {card} |"
        )
    rows += ["", "| image at the budget, LoRA " + result["images"]["lora"] + " | seconds |", "|---|---|"]
    rows += [f"| {k} | {v['seconds']:.2f} |" for k, v in result["images"].items() if isinstance(v, dict)]
    return "\n".join(rows)


if __name__ == "__main__":
    main()
