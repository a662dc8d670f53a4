"""Low-VRAM generation on a GPU: NF4 resident vs the diffusers leaf_level recipe vs flux2-split's planner.

Builds the real-size FLUX.2-dev DiT (random weights, bitsandbytes NF4; `bench._models.build_nf4_dit`) and
VAE without a checkpoint, in host memory as a pre-quantized checkpoint is after loading on the CPU. Each
configuration runs in its own process, with the allocator capped before any allocation, and reports
s/step, whole-generation time (incl. VAE decode), peak allocated/reserved, what the card really holds and
host RSS; for `plan`, also the planner's estimates beside what was measured: weights on the card, the
DiT's and the VAE decode's transient peaks, memory outside the allocator (tests/gpu checks them).

    python -m bench.lowvram --out results.json                 # the default matrix
    python -m bench.lowvram --configs plan:8:0,leaf:8:0        # mode:cap_GiB:reference_images

Caps: for `leaf` and `resident` the cap is the allocator's (set_per_process_memory_fraction), as the
anchors in docs/design.md#dit-step-times were measured; for `plan` it is the planner's budget for everything on the card
(allocator cap = budget minus the CUDA overhead estimate), which is stricter.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

GiB = 1 << 30
DEFAULT_CONFIGS = "resident:0:0,plan:8:0,leaf:8:0,plan:8:2,leaf:8:2,plan:4:0,leaf:4:0"
REPO_ROOT = Path(__file__).resolve().parents[1]


def _rss() -> tuple[int, int]:
    cur = peak = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return cur, peak


def card_used(index: int) -> int:
    """Bytes this process holds on the card: nvidia-smi's per-process figure when it lists us, else what
    the driver reports used on the whole device (the same on a machine of our own)."""
    import torch

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
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    free, total = torch.cuda.mem_get_info(index)
    return total - free


class CardSampler(threading.Thread):
    """Samples what the card holds for this process every 0.2 s, keeping the peak."""

    def __init__(self, index: int):
        super().__init__(daemon=True)
        self.index, self.peak, self._halt = index, 0, threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, card_used(self.index))
            self._halt.wait(0.2)

    def stop(self) -> int:
        self._halt.set()
        self.join(5)
        return self.peak


def _h2d_gbps(streamer: Any) -> float:
    """Host->device bandwidth of one unit's copy into a slot, timed with CUDA events (the slot is
    marked empty afterwards, so the next forward loads its unit again)."""
    import torch

    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    n = streamer.host_units[0].numel()
    a.record()
    for _ in range(3):
        streamer.slots[0][:n].copy_(streamer.host_units[0], non_blocking=True)
    b.record()
    torch.cuda.synchronize()
    streamer.invalidate()
    return 3 * n / (a.elapsed_time(b) / 1000) / 1e9


def worker(mode: str, cap: float, refs: int, steps: int, overhead_gib: float | None) -> dict:
    """One configuration in this process (which must not have touched CUDA yet)."""
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from flux2_client.offload import apply_leaf_level_offloading, apply_memory_plan, plan_for
    from flux2_client.planner import DEFAULT_CUDA_OVERHEAD, Workload
    from flux2_client.tiny import FLUX2_SCHEDULER_CONFIG

    from ._models import build_nf4_dit

    device = torch.device("cuda", torch.cuda.current_device())
    index = device.index or 0
    total = torch.cuda.get_device_properties(device).total_memory
    result: dict[str, Any] = {"mode": mode, "cap_gib": cap, "refs": refs, "card": torch.cuda.get_device_name(device)}
    overhead = int(overhead_gib * GiB) if overhead_gib is not None else DEFAULT_CUDA_OVERHEAD
    if cap:
        alloc_cap = cap * GiB if mode != "plan" else cap * GiB - overhead
        torch.cuda.set_per_process_memory_fraction(alloc_cap / total, device)  # before any allocation
        result["allocator_cap_gib"] = alloc_cap / GiB
    torch.empty(1, device=device)
    result["context_bytes"] = card_used(index)

    t0 = time.perf_counter()
    transformer = build_nf4_dit(device)
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
    result["vae_weight_bytes"] = sum(t.numel() * t.element_size() for t in [*vae.parameters(), *vae.buffers()])

    t0 = time.perf_counter()
    torch.cuda.synchronize()
    allocated_before_setup = torch.cuda.memory_allocated(device)
    if mode == "resident":
        transformer.to(device)
    elif mode == "leaf":
        apply_leaf_level_offloading(transformer, device)
    elif mode == "plan":
        workload = Workload(1024, 1024, reference_sizes=((1024, 1024),) * refs)
        plan = plan_for(transformer, vae, workload, device, vram=int(cap * GiB) if cap else None, overhead=overhead)
        print(plan.describe(), flush=True)
        streamer = apply_memory_plan(pipe, plan, device)
        result["plan"] = plan.as_dict()
        result["plan"].update(
            budget=plan.budget.vram,
            overhead=plan.budget.overhead,
            device_weight_bytes=plan.device_weight_bytes,
            vae_decode_bytes=plan.vae_decode_bytes,
        )
        result["pinned"] = streamer.pinned
        if streamer.num_units:
            result["h2d_gbps"] = _h2d_gbps(streamer)
            result["streamed_bytes_per_step"] = sum(u.numel() for u in streamer.host_units)
    else:
        raise ValueError(f"mode: expected resident, leaf or plan, got {mode!r}")
    torch.cuda.synchronize()
    result["setup_s"] = time.perf_counter() - t0
    result["weights_allocated_by_setup"] = torch.cuda.memory_allocated(device) - allocated_before_setup
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

    def call(num_steps: int, on_step: Any = None, output_type: str = "pil") -> Any:
        return pipe(
            prompt_embeds=embeds,
            image=images,
            height=1024,
            width=1024,
            num_inference_steps=num_steps,
            guidance_scale=4.0,
            generator=torch.Generator("cpu").manual_seed(0),
            callback_on_step_end=on_step,
            output_type=output_type,
        ).images

    pipe.set_progress_bar_config(disable=True)
    sampler = CardSampler(index)
    sampler.start()
    try:
        call(1)  # warm-up: kernels, cuBLAS handles, first loads
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        allocated_before_call = torch.cuda.memory_allocated(device)
        marks: list = []
        denoise_peak: dict[str, int] = {}

        def on_step(_pipe: Any, i: int, _t: Any, kw: dict) -> dict:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            marks.append(ev)
            if i == steps - 1:
                # The denoising loop's peaks end here; the VAE decode's are measured from a fresh start.
                denoise_peak.update(
                    allocated=torch.cuda.max_memory_allocated(device),
                    reserved=torch.cuda.max_memory_reserved(device),
                    allocated_now=torch.cuda.memory_allocated(device),
                )
                torch.cuda.reset_peak_memory_stats(device)
            return kw

        t0 = time.perf_counter()
        call(steps, on_step)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        decode_allocated = torch.cuda.max_memory_allocated(device)
        decode_reserved = torch.cuda.max_memory_reserved(device)
        steps_ms = [marks[i].elapsed_time(marks[i + 1]) for i in range(len(marks) - 1)]
        result.update(
            ok=True,
            s_per_step=sum(steps_ms) / len(steps_ms) / 1000,
            step_ms=steps_ms,
            generation_s=wall,
            steps=steps,
            peak_allocated=max(denoise_peak["allocated"], decode_allocated),
            peak_reserved=max(denoise_peak["reserved"], decode_reserved),
            # Transient memory above what was allocated when each phase began (weights, embeddings, latents).
            denoise_transient_peak=denoise_peak["allocated"] - allocated_before_call,
            decode_transient_peak=decode_allocated - denoise_peak["allocated_now"],
        )
        # Same weights (seeded build), same inputs: every mode must give the same latents bit for bit.
        latents = call(2, output_type="latent")
        result["latents_sha256"] = hashlib.sha256(latents.float().cpu().numpy().tobytes()).hexdigest()[:16]
    except torch.OutOfMemoryError as exc:
        result.update(ok=False, error=f"OOM: {str(exc).splitlines()[0][:300]}")
    except Exception as exc:
        result.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
    result["card_peak_sampled"] = sampler.stop()
    result["card_now"] = card_used(index)
    result["reserved_now"] = torch.cuda.memory_reserved(device)
    result["outside_allocator_now"] = result["card_now"] - result["reserved_now"]
    result["card_peak_est"] = result["outside_allocator_now"] + result.get("peak_reserved", 0)
    result["rss"], result["rss_peak"] = _rss()
    return result


def run_config(mode: str, cap: float, refs: int, steps: int, overhead_gib: float | None = None) -> dict:
    """Run one configuration in a fresh process (`python -m bench.lowvram --worker`) and return its
    result; the process's other output (the plan) is in result["log"]."""
    env = dict(os.environ)
    # The recipe runs as the anchors did (default allocator); the planner asks for expandable segments.
    if mode == "plan":
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    else:
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    cmd = [sys.executable, "-m", "bench.lowvram", "--worker", "--mode", mode, "--cap", str(cap), "--refs", str(refs)]
    cmd += ["--steps", str(steps)]
    if overhead_gib is not None:
        cmd += ["--overhead", str(overhead_gib)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if lines:
        res = json.loads(lines[-1][7:])
    else:
        res = {"mode": mode, "cap_gib": cap, "refs": refs, "ok": False}
        res["error"] = f"exit {proc.returncode}: {proc.stderr[-800:]}"
    res["process_s"] = time.perf_counter() - t0
    res["log"] = "\n".join(ln for ln in proc.stdout.splitlines() if not ln.startswith("RESULT "))[-6000:]
    return res


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma list of mode:cap_GiB:refs")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("lowvram.json"))
    parser.add_argument("--budget-s", type=float, default=480, help="stop starting new configs after this")
    parser.add_argument("--overhead", type=float, default=None, help="planner's CUDA overhead estimate, GiB")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--cap", type=float, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--refs", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.mode, args.cap, args.refs, args.steps, args.overhead)), flush=True)
        return
    start = time.perf_counter()
    results = []
    for spec in args.configs.split(","):
        mode, cap, refs = spec.split(":")
        if time.perf_counter() - start > args.budget_s:
            results.append({"mode": mode, "cap_gib": float(cap), "refs": int(refs), "ok": False, "error": "skipped"})
            continue
        steps = args.steps if int(refs) == 0 else max(3, args.steps - 2)
        res = run_config(mode, float(cap), int(refs), steps, args.overhead)
        if res["log"]:
            print(res["log"][-4000:])
        print(json.dumps({k: v for k, v in res.items() if k != "log"}), flush=True)
        results.append(res)
        args.out.write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
