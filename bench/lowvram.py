"""Low-VRAM generation on a GPU: NF4 resident vs the diffusers leaf_level recipe vs flux2-split's planner.

Builds the real-size FLUX.2-dev DiT (random weights, bitsandbytes NF4; `bench._models.build_nf4_dit`) and
VAE without a checkpoint, in host memory as a pre-quantized checkpoint is after loading on the CPU. Each
configuration runs in its own process, with the allocator capped before any allocation, and reports
s/step, whole-generation time (incl. VAE decode), peak allocated/reserved, what the card really holds and
host RSS; for `plan`, also the planner's estimates beside what was measured: weights on the card, the
DiT's and the VAE decode's transient peaks, memory outside the allocator (tests/gpu checks them).

    python -m bench.lowvram --out results.json                 # the default matrix
    python -m bench.lowvram --configs plan:8:0,leaf:8:0        # mode:cap_GiB:reference_images
    python -m bench.lowvram --checkpoint /tmp/nf4-dit --configs plan:8:0:copy,plan:8:0:stream
    python -m bench.lowvram --family klein-9b --configs resident:0:0,plan:4:0 --steps 4

`--family klein-4b|klein-9b` builds the FLUX.2 [klein] DiT instead (shapes from diffusers' conversion
script, docs/design.md#model-shapes-and-sizes) and runs `Flux2KleinPipeline` (distilled: no guidance) with
embeddings of its width. Every row times `--repeats` generations (default 3) and reports the median s/step
with the spread.

Host RAM (issue 11): every row reports the process's peak RSS while loading (from the start of the DiT's
load to the end of the plan's layout) and while generating, and its RSS at each stage (anonymous and
file-backed pages apart). `plan` rows take a fourth field, the streamer's load mode: `stream` (default:
each source let go as soon as it is copied) or `copy` (every source kept until the layout is done, the
behaviour before issue 11). `--checkpoint DIR` loads the DiT the way the CLI does, from a pre-quantized
folder with `load_nf4_transformer` (memory-mapped safetensors); the folder is written once (the seeded
build, `save_pretrained`) if it does not hold one. Without it the DiT is the seeded build in anonymous
host memory.

Caps: for `plan` the cap is the planner's budget for everything on the card (allocator cap = budget minus the
CUDA overhead estimate). For `leaf` and `resident`, `--recipe-cap total` (the default since issue 15) gives the
recipe the same card total: allocator cap = cap minus what the card already holds once the CUDA context is up
(measured in that process); `--recipe-cap allocator` caps only the allocator, as the anchors in
docs/design.md#dit-step-times were measured. `leaf` rows take a fourth field of recipe options joined by `+`:
`es` (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, the planner's allocator setting) and `lcmu`
(diffusers' `enable_group_offload(low_cpu_mem_usage=True)`), e.g. `leaf:8:0:es+lcmu`.
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
#: Transformer configs per family, as `Flux2Transformer2DModel` overrides of its FLUX.2-dev defaults (FLUX.2
#: [klein]: diffusers' conversion script; docs/design.md#model-shapes-and-sizes).
DIT_CONFIGS: dict[str, dict[str, Any]] = {
    "dev": {},
    "klein-4b": dict(
        num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680, guidance_embeds=False
    ),
    "klein-9b": dict(
        num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288, guidance_embeds=False
    ),
}
REPO_ROOT = Path(__file__).resolve().parents[1]


def _host() -> dict[str, int]:
    """This process's VmRSS, VmHWM (peak), RssAnon and RssFile in bytes (/proc/self/status)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) * 1024
    return out


def _rss() -> tuple[int, int]:
    host = _host()
    return host["VmRSS"], host["VmHWM"]


class HostPeak(threading.Thread):
    """Peak host RSS over a stretch of the run: the kernel's own high-water mark, reset at the start
    (/proc/self/clear_refs "5"), and, where that reset is refused, RSS sampled every 20 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sampled, self._halt = 0, threading.Event()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.exact = True
        except OSError:
            self.exact = False
        self.start()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sampled = max(self.sampled, _host()["VmRSS"])
            self._halt.wait(0.02)

    def stop(self) -> int:
        self._halt.set()
        self.join(5)
        return max(self.sampled, _host()["VmHWM"]) if self.exact else self.sampled


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


def worker(
    mode: str,
    cap: float,
    refs: int,
    steps: int,
    overhead_gib: float | None,
    load_mode: str = "stream",
    checkpoint: str | None = None,
    family: str = "dev",
    repeats: int = 3,
    recipe_cap: str = "total",
) -> dict:
    """One configuration in this process (which must not have touched CUDA yet)."""
    import statistics

    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline
    from flux2_client._quantization import load_nf4_transformer
    from flux2_client.offload import apply_leaf_level_offloading, apply_memory_plan, plan_for, spec_from_module
    from flux2_client.planner import DEFAULT_CUDA_OVERHEAD, Workload
    from flux2_client.tiny import FLUX2_SCHEDULER_CONFIG

    from ._models import build_nf4_dit

    device = torch.device("cuda", torch.cuda.current_device())
    index = device.index or 0
    total = torch.cuda.get_device_properties(device).total_memory
    result: dict[str, Any] = {"mode": mode, "cap_gib": cap, "refs": refs, "card": torch.cuda.get_device_name(device)}
    result["family"] = family
    result.update(load_mode=load_mode if mode == "plan" else None, dit_source="checkpoint" if checkpoint else "build")
    result["recipe_options"] = load_mode if mode == "leaf" else None
    overhead = int(overhead_gib * GiB) if overhead_gib is not None else DEFAULT_CUDA_OVERHEAD
    torch.cuda.init()
    context = card_used(index)  # the CUDA context, before any allocation
    if cap:
        if mode == "plan":
            alloc_cap = cap * GiB - overhead
        elif recipe_cap == "total":  # the same card total as the planner, CUDA context included
            alloc_cap = cap * GiB - context
        else:
            alloc_cap = cap * GiB
        torch.cuda.set_per_process_memory_fraction(alloc_cap / total, device)  # before any allocation
        result["allocator_cap_gib"] = alloc_cap / GiB
        result["recipe_cap"] = recipe_cap if mode != "plan" else None
    torch.empty(1, device=device)
    result["context_bytes"] = card_used(index)
    result["context_before_alloc_bytes"] = context

    result["host_start"] = _host()

    t0 = time.perf_counter()
    load_peak = None
    if checkpoint:
        # The CLI's path: the pre-quantized DiT from disk into host memory (memory-mapped safetensors).
        load_peak = HostPeak()
        transformer = load_nf4_transformer(checkpoint, device="cpu")
    else:
        transformer = build_nf4_dit(device, config=DIT_CONFIGS[family])
    vae = AutoencoderKLFlux2().to(device, torch.bfloat16).eval()
    components = dict(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
    )
    # Klein [distilled]: no guidance embedder, no classifier-free guidance (one DiT call a step).
    pipe = Flux2Pipeline(**components) if family == "dev" else Flux2KleinPipeline(**components, is_distilled=True)
    result["build_s"] = time.perf_counter() - t0
    result["rss_after_build"] = _rss()[0]
    result["host_after_build"] = _host()
    result["vae_weight_bytes"] = sum(t.numel() * t.element_size() for t in [*vae.parameters(), *vae.buffers()])
    result["dit_bytes"] = spec_from_module(transformer).loaded_bytes  # packed weights, as the slabs hold them
    if load_peak is None:
        # The seeded build holds more than a load would while it quantizes: measure from the layout on.
        load_peak = HostPeak()

    t0 = time.perf_counter()
    torch.cuda.synchronize()
    allocated_before_setup = torch.cuda.memory_allocated(device)
    if mode == "resident":
        transformer.to(device)
    elif mode == "leaf":
        apply_leaf_level_offloading(transformer, device, low_cpu_mem_usage="lcmu" in load_mode.split("+"))
    elif mode == "plan":
        workload = Workload(1024, 1024, reference_sizes=((1024, 1024),) * refs)
        plan = plan_for(transformer, vae, workload, device, vram=int(cap * GiB) if cap else None, overhead=overhead)
        print(plan.describe(), flush=True)
        streamer = apply_memory_plan(pipe, plan, device, load_mode=load_mode)
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
    result["rss_peak_load"] = load_peak.stop()
    result["rss_peak_load_exact"] = load_peak.exact
    result["host_after_setup"] = _host()
    del transformer

    gen = torch.Generator(device).manual_seed(0)
    width = pipe.transformer.config.joint_attention_dim
    embeds = torch.randn(1, 512, width, device=device, dtype=torch.bfloat16, generator=gen)
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
            guidance_scale=4.0 if family == "dev" else 1.0,  # distilled Klein: no CFG
            generator=torch.Generator("cpu").manual_seed(0),
            callback_on_step_end=on_step,
            output_type=output_type,
        ).images

    pipe.set_progress_bar_config(disable=True)
    sampler = CardSampler(index)
    sampler.start()
    generation_peak = HostPeak()
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
        # More timed generations (the peaks above come from the first): s/step and seconds are the median.
        per_run = [sum(steps_ms) / len(steps_ms) / 1000]
        walls = [wall]
        for _ in range(repeats - 1):
            marks.clear()
            t0 = time.perf_counter()
            call(steps, on_step)
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0)
            run_ms = [marks[i].elapsed_time(marks[i + 1]) for i in range(len(marks) - 1)]
            per_run.append(sum(run_ms) / len(run_ms) / 1000)
        result["rss_peak_generation"] = generation_peak.stop()  # warm-up and timed call, VAE decode included
        result.update(
            ok=True,
            s_per_step=statistics.median(per_run),
            s_per_step_runs=per_run,
            generation_s_runs=walls,
            step_ms=steps_ms,
            generation_s=statistics.median(walls),
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
    if "rss_peak_generation" not in result:
        generation_peak.stop()
    result["card_peak_sampled"] = sampler.stop()
    result["card_now"] = card_used(index)
    result["reserved_now"] = torch.cuda.memory_reserved(device)
    result["outside_allocator_now"] = result["card_now"] - result["reserved_now"]
    result["card_peak_est"] = result["outside_allocator_now"] + result.get("peak_reserved", 0)
    result["rss"], result["rss_peak"] = _rss()
    return result


def save_checkpoint(folder: Path) -> None:
    """Write the seeded real-size NF4 DiT as a pre-quantized checkpoint in `folder` (in its own process,
    so no GPU memory of the build stays with the caller)."""
    code = (
        "import torch; from bench._models import build_nf4_dit, save_nf4_dit; "
        f"save_nf4_dit(build_nf4_dit(torch.device('cuda')), {str(folder)!r})"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=900)


def run_config(
    mode: str,
    cap: float,
    refs: int,
    steps: int,
    overhead_gib: float | None = None,
    load_mode: str = "stream",
    checkpoint: Path | None = None,
    family: str = "dev",
    repeats: int = 3,
    recipe_cap: str = "total",
) -> dict:
    """Run one configuration in a fresh process (`python -m bench.lowvram --worker`) and return its
    result; the process's other output (the plan) is in result["log"]."""
    env = dict(os.environ)
    # The recipe runs as the anchors did (default allocator); the planner asks for expandable segments.
    if mode == "plan" or (mode == "leaf" and "es" in load_mode.split("+")):
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    else:
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    cmd = [sys.executable, "-m", "bench.lowvram", "--worker", "--mode", mode, "--cap", str(cap), "--refs", str(refs)]
    cmd += ["--steps", str(steps)]
    if overhead_gib is not None:
        cmd += ["--overhead", str(overhead_gib)]
    cmd += ["--load-mode", load_mode, "--family", family, "--repeats", str(repeats), "--recipe-cap", recipe_cap]
    if checkpoint is not None:
        cmd += ["--checkpoint", str(checkpoint)]
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
    head = (
        "| mode | cap | refs | load | s/step | generation s | peak alloc / reserved GiB | card peak GiB | host RSS GiB "
        "| host peak load / generation GiB | DiT GiB |"
    )
    rows = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        options = r.get("load_mode") or r.get("recipe_options")
        load = f"{r.get('dit_source', 'build')}/{options}" if options else r.get("dit_source", "")
        first = f"| {r['mode']} | {r['cap_gib']} | {r['refs']} | {load} |"
        if not r.get("ok"):
            rows.append(f"{first} {r.get('error', '')[:80]} | | | | | | |")
            continue
        rows.append(
            f"{first} {r['s_per_step']:.3f} | {r['generation_s']:.2f} | "
            f"{r['peak_allocated'] / GiB:.2f} / {r['peak_reserved'] / GiB:.2f} | "
            f"{max(r['card_peak_sampled'], r['card_peak_est']) / GiB:.2f} | {r['rss'] / GiB:.1f} | "
            f"{r['rss_peak_load'] / GiB:.2f} / {r['rss_peak_generation'] / GiB:.2f} | {r['dit_bytes'] / GiB:.2f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--configs",
        default=DEFAULT_CONFIGS,
        help="comma list of mode:cap_GiB:refs[:options] (plan: load mode stream|copy; leaf: es, lcmu, es+lcmu)",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="load the DiT from this pre-quantized folder as the CLI does (written once if it holds none)",
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--family", choices=sorted(DIT_CONFIGS), default="dev", help="which DiT (default FLUX.2-dev)")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per row (median reported)")
    parser.add_argument(
        "--recipe-cap",
        choices=("total", "allocator"),
        default="total",
        help="leaf/resident caps: the whole card total as the planner's (default) or the allocator only",
    )
    parser.add_argument("--out", type=Path, default=Path("lowvram.json"))
    parser.add_argument("--budget-s", type=float, default=480, help="stop starting new configs after this")
    parser.add_argument("--overhead", type=float, default=None, help="planner's CUDA overhead estimate, GiB")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--cap", type=float, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--refs", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--load-mode", default="stream", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    checkpoint = str(args.checkpoint) if args.checkpoint else None
    if args.worker:
        res = worker(
            args.mode,
            args.cap,
            args.refs,
            args.steps,
            args.overhead,
            args.load_mode,
            checkpoint,
            family=args.family,
            repeats=args.repeats,
            recipe_cap=args.recipe_cap,
        )
        print("RESULT " + json.dumps(res), flush=True)
        return
    start = time.perf_counter()
    if args.checkpoint is not None and not (args.checkpoint / "transformer" / "config.json").is_file():
        t0 = time.perf_counter()
        save_checkpoint(args.checkpoint)
        print(f"wrote the NF4 DiT checkpoint to {args.checkpoint} in {time.perf_counter() - t0:.0f} s", flush=True)
    results = []
    for spec in args.configs.split(","):
        mode, cap, refs, *rest = spec.split(":")
        load_mode = rest[0] if rest else ("stream" if mode == "plan" else "")
        if time.perf_counter() - start > args.budget_s:
            results.append({"mode": mode, "cap_gib": float(cap), "refs": int(refs), "ok": False, "error": "skipped"})
            continue
        steps = args.steps if int(refs) == 0 else max(3, args.steps - 2)
        res = run_config(
            mode,
            float(cap),
            int(refs),
            steps,
            args.overhead,
            load_mode,
            args.checkpoint,
            args.family,
            args.repeats,
            args.recipe_cap,
        )
        if res["log"]:
            print(res["log"][-4000:])
        print(json.dumps({k: v for k, v in res.items() if k != "log"}), flush=True)
        results.append(res)
        args.out.write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
