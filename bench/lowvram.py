"""Low-VRAM generation on a GPU: NF4 resident vs the diffusers leaf_level recipe vs flux2-split's planner.

Builds the real-size FLUX.2-dev DiT (random weights, bitsandbytes NF4) and VAE without a checkpoint:
the DiT is constructed on the meta device, its Linears swapped for Linear4bit, each weight drawn in bf16
on the GPU, quantised there and moved to host memory — the state a pre-quantised checkpoint is in after
loading on the CPU. Each configuration runs in its own process, with the allocator capped before any
allocation, and reports s/step, whole-generation time (incl. VAE decode), peak allocated/reserved, what
the card really holds (NVML) and host RSS.

    python bench/lowvram.py --out results.json                 # the default matrix
    python bench/lowvram.py --configs plan:8:0,leaf:8:0        # mode:cap_GiB:reference_images

Caps: for `leaf` and `resident` the cap is the allocator's (set_per_process_memory_fraction), as the
anchors in docs/design.md#dit-step-times were measured; for `plan` it is the planner's budget for everything on the card
(allocator cap = budget minus the CUDA overhead estimate), which is stricter.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

GiB = 1 << 30
DEFAULT_CONFIGS = "resident:0:0,plan:8:0,leaf:8:0,plan:8:2,leaf:8:2,plan:4:0,leaf:4:0"


def _rss() -> tuple[int, int]:
    cur = peak = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return cur, peak


def _card_used(torch, index: int) -> int:
    """Bytes this process holds on the card (NVML per-process when possible, else device total)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        for line in out.strip().splitlines():
            pid, used = (x.strip() for x in line.split(","))
            if int(pid) == os.getpid():
                return int(used) * (1 << 20)
    except Exception:
        pass
    return int(torch.cuda.device_memory_used(index))


class CardSampler(threading.Thread):
    """Samples what the card holds for this process every 0.2 s (nvidia-smi), keeping the peak."""

    def __init__(self, torch, index: int):
        super().__init__(daemon=True)
        self.torch, self.index, self.peak, self._halt = torch, index, 0, threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, _card_used(self.torch, self.index))
            self._halt.wait(0.2)

    def stop(self) -> int:
        self._halt.set()
        self.join(5)
        return self.peak


def build_nf4_dit(torch, device, double_quant: bool = False, config: dict | None = None):
    import bitsandbytes as bnb
    from accelerate import init_empty_weights
    from diffusers import BitsAndBytesConfig, Flux2Transformer2DModel
    from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear

    with init_empty_weights():
        model = Flux2Transformer2DModel(**(config or {}))
    qconfig = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=double_quant,
    )
    model = replace_with_bnb_linear(model, modules_to_not_convert=[], quantization_config=qconfig)
    # Seeded, so every build (every process) holds the same weights and outputs can be compared.
    gen = torch.Generator(device).manual_seed(0)
    cpu_gen = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = torch.randn(module.out_features, module.in_features, device=device, dtype=torch.bfloat16, generator=gen)
            w.mul_(module.in_features**-0.5)
            param = bnb.nn.Params4bit(
                w, requires_grad=False, quant_type="nf4", compress_statistics=double_quant, module=module
            ).to(device)
            del w
            module.weight = param.to("cpu")  # like a pre-quantised checkpoint loaded on the CPU
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                # norm scales: near 1
                module._parameters[name] = torch.nn.Parameter(
                    1 + 0.01 * torch.randn(p.shape, generator=cpu_gen).to(torch.bfloat16), requires_grad=False
                )
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_meta:
                module._buffers[name] = torch.zeros(b.shape, dtype=b.dtype)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return model.eval()


def worker(args: argparse.Namespace) -> dict:
    import torch

    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    mode, cap, refs = args.mode, args.cap, args.refs
    result: dict = {"mode": mode, "cap_gib": cap, "refs": refs, "card": torch.cuda.get_device_name(device)}
    from flux2_client.planner import DEFAULT_CUDA_OVERHEAD

    overhead = int(args.overhead * GiB) if args.overhead is not None else DEFAULT_CUDA_OVERHEAD
    if cap:
        alloc_cap = cap * GiB if mode != "plan" else cap * GiB - overhead
        torch.cuda.set_per_process_memory_fraction(alloc_cap / total, device)  # before any allocation
        result["allocator_cap_gib"] = alloc_cap / GiB
    torch.empty(1, device=device)
    result["context_bytes"] = _card_used(torch, device.index or 0)

    t0 = time.perf_counter()
    transformer = build_nf4_dit(torch, device)
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from flux2_client.tiny import FLUX2_SCHEDULER_CONFIG

    vae = AutoencoderKLFlux2().to(device, torch.bfloat16).eval()
    pipe = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
    )
    result["build_s"] = time.perf_counter() - t0
    result["rss_after_build"] = _rss()[0]

    t0 = time.perf_counter()
    if mode == "resident":
        transformer.to(device)
    elif mode == "leaf":
        from flux2_client.generation import _move_quant_state

        _move_quant_state(transformer, device)
        transformer.enable_group_offload(
            onload_device=device, offload_device=torch.device("cpu"), offload_type="leaf_level", use_stream=True
        )
    elif mode == "plan":
        from flux2_client.offload import BlockStreamer, configure_allocator, configure_vae, plan_for
        from flux2_client.planner import Workload

        workload = Workload(1024, 1024, reference_sizes=((1024, 1024),) * refs)
        plan = plan_for(transformer, vae, workload, device, vram=cap * GiB if cap else None, overhead=overhead)
        print(plan.describe(), flush=True)
        configure_allocator(plan, device)
        streamer = BlockStreamer(transformer, plan, device)
        configure_vae(vae, plan)
        result["plan"] = plan.as_dict()
        result["pinned"] = streamer.pinned
        # Measured host->device bandwidth for one unit, for the transfer-vs-compute note.
        if streamer.num_units:
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            n = streamer.host_units[0].numel()
            a.record()
            for _ in range(3):
                streamer.slots[0][:n].copy_(streamer.host_units[0], non_blocking=True)
            b.record()
            torch.cuda.synchronize()
            streamer.loaded[0] = None
            result["h2d_gbps"] = 3 * n / (a.elapsed_time(b) / 1000) / 1e9
            result["streamed_bytes_per_step"] = sum(u.numel() for u in streamer.host_units)
    result["setup_s"] = time.perf_counter() - t0
    result["rss_after_setup"] = _rss()[0]
    del transformer

    gen = torch.Generator(device).manual_seed(0)
    embeds = torch.randn(1, 512, 15360, device=device, dtype=torch.bfloat16, generator=gen)
    images = None
    if refs:
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)) for _ in range(refs)]

    def call(steps: int, marks: list | None = None, output_type: str = "pil"):
        def on_step(_pipe, i, _t, kw):
            if marks is not None:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                marks.append(ev)
            return kw

        return pipe(
            prompt_embeds=embeds,
            image=images,
            height=1024,
            width=1024,
            num_inference_steps=steps,
            guidance_scale=4.0,
            generator=torch.Generator("cpu").manual_seed(0),
            callback_on_step_end=on_step,
            output_type=output_type,
        ).images

    pipe.set_progress_bar_config(disable=True)
    sampler = CardSampler(torch, device.index or 0)
    sampler.start()
    try:
        call(1)  # warm-up: kernels, cuBLAS handles, first loads
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        marks: list = []
        t0 = time.perf_counter()
        call(args.steps, marks)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        steps_ms = [marks[i].elapsed_time(marks[i + 1]) for i in range(len(marks) - 1)]
        result.update(
            ok=True,
            s_per_step=sum(steps_ms) / len(steps_ms) / 1000,
            step_ms=steps_ms,
            generation_s=wall,
            steps=args.steps,
            peak_allocated=torch.cuda.max_memory_allocated(device),
            peak_reserved=torch.cuda.max_memory_reserved(device),
        )
        # Same weights (seeded build), same inputs: every mode must give the same latents bit for bit.
        import hashlib

        latents = call(2, output_type="latent")
        result["latents_sha256"] = hashlib.sha256(latents.float().cpu().numpy().tobytes()).hexdigest()[:16]
    except torch.OutOfMemoryError as exc:
        result.update(ok=False, error=f"OOM: {str(exc).splitlines()[0][:300]}")
    except Exception as exc:
        result.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
    result["card_peak_sampled"] = sampler.stop()
    result["card_now"] = _card_used(torch, device.index or 0)
    result["reserved_now"] = torch.cuda.memory_reserved(device)
    result["card_peak_est"] = result["card_now"] - result["reserved_now"] + torch.cuda.max_memory_reserved(device)
    result["rss"], result["rss_peak"] = _rss()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma list of mode:cap_GiB:refs")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("lowvram.json"))
    parser.add_argument("--budget-s", type=float, default=480, help="stop starting new configs after this")
    parser.add_argument("--overhead", type=float, default=None, help="planner's CUDA overhead estimate, GiB")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--mode")
    parser.add_argument("--cap", type=float, default=0)
    parser.add_argument("--refs", type=int, default=0)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    start = time.perf_counter()
    results = []
    for spec in args.configs.split(","):
        mode, cap, refs = spec.split(":")
        if time.perf_counter() - start > args.budget_s:
            results.append({"mode": mode, "cap_gib": float(cap), "refs": int(refs), "ok": False, "error": "skipped"})
            continue
        env = dict(os.environ)
        # The recipe runs as the anchors did (default allocator); the planner asks for expandable segments.
        if mode == "plan":
            env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        else:
            env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        steps = args.steps if int(refs) == 0 else max(3, args.steps - 2)
        cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--cap", cap, "--refs", refs]
        cmd += ["--steps", str(steps)]
        if args.overhead is not None:
            cmd += ["--overhead", str(args.overhead)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if lines:
            res = json.loads(lines[-1][7:])
        else:
            res = {
                "mode": mode,
                "cap_gib": float(cap),
                "refs": int(refs),
                "ok": False,
                "error": f"exit {proc.returncode}: {proc.stderr[-800:]}",
            }
        res["process_s"] = time.perf_counter() - t0
        plan_lines = [ln for ln in proc.stdout.splitlines() if not ln.startswith("RESULT ")]
        if plan_lines:
            print("\n".join(plan_lines[-60:]))
        print(json.dumps(res), flush=True)
        results.append(res)
        args.out.write_text(json.dumps(results, indent=1))
    print(table(results))


def table(results: list[dict]) -> str:
    head = "| mode | cap | refs | s/step | generation s | peak alloc / reserved GiB | card peak GiB | host RSS GiB |"
    rows = [head, "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if not r.get("ok"):
            rows.append(f"| {r['mode']} | {r['cap_gib']} | {r['refs']} | {r.get('error', '')[:80]} | | | | |")
            continue
        rows.append(
            f"| {r['mode']} | {r['cap_gib']} | {r['refs']} | {r['s_per_step']:.3f} | {r['generation_s']:.2f} | "
            f"{r['peak_allocated'] / GiB:.2f} / {r['peak_reserved'] / GiB:.2f} | "
            f"{max(r['card_peak_sampled'], r['card_peak_est']) / GiB:.2f} | {r['rss'] / GiB:.1f} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
