"""Where the encoder engine's time goes on one GPU, and what CUDA graphs change, side by side in one run.

peak      bf16 8192^3 matmul TFLOP/s: the anchor for every "fraction of the limit" figure
gemm      the seven matmuls of one decoder layer at the real shapes, alone, x 30 layers: the GEMM-only
          floor of the forward at batch B (prompts/s it would give with everything else free); also the
          same work as fused q|k|v and gate|up matmuls
engine    EncoderEngine (bf16, torch.compile'd, reproducible) at each batch: prompts/s end to end
profile   torch.profiler over one compiled forward at the largest batch: kernel time by kind (GEMM,
          attention, fused elementwise, copies), and the share of the wall time the GPU was busy
graphs    the same engine with CUDA graphs captured: prompts/s, capture time, and whether the bytes equal
          the compiled eager forward's (same prompts, same batch) and a padded bucket's
autotune  torch.compile mode max-autotune-no-cudagraphs at one fixed batch (compile time, prompts/s)

  python -m bench.engine_profile --out results/ --batches 16 32       # from the repository root, on a GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ._measure import Report, compare, log, measure, row_sha
from ._models import build_encoder, prompts

LAYERS = 30


def cuda_ms(fn: Any, reps: int = 10, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def peak(report: Report) -> None:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = cuda_ms(lambda: a @ b, reps=50, warmup=10)
    report["peak_bf16_tflops_8192"] = round(2 * 8192**3 / ms / 1e9, 1)
    log("peak", report["peak_bf16_tflops_8192"])


def gemm(report: Report, layer: Any, batches: list[int]) -> None:
    attn, mlp = layer.self_attn, layer.mlp
    weights = {name: getattr(mod, name).weight for mod, names in
               ((attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (mlp, ("gate_proj", "up_proj", "down_proj")))
               for name in names}  # fmt: skip
    fused = {
        "qkv": torch.cat([weights["q_proj"], weights["k_proj"], weights["v_proj"]]),
        "gate_up": torch.cat([weights["gate_proj"], weights["up_proj"]]),
    }
    flop_per_token = 2 * sum(w.numel() for w in weights.values())
    rows = {}
    for b in batches:
        m = b * 512
        x = torch.randn(m, 5120, device="cuda", dtype=torch.bfloat16)
        x_o = torch.randn(m, weights["o_proj"].shape[1], device="cuda", dtype=torch.bfloat16)
        x_d = torch.randn(m, weights["down_proj"].shape[1], device="cuda", dtype=torch.bfloat16)
        per = {}
        for name, w in weights.items():
            inp = x_o if name == "o_proj" else x_d if name == "down_proj" else x
            ms = cuda_ms(lambda inp=inp, w=w: torch.nn.functional.linear(inp, w))
            per[name] = {"ms": round(ms, 3), "tflops": round(2 * m * w.numel() / ms / 1e9, 1)}
        for name, w in fused.items():
            ms = cuda_ms(lambda w=w, x=x: torch.nn.functional.linear(x, w))
            per[f"fused_{name}"] = {"ms": round(ms, 3), "tflops": round(2 * m * w.numel() / ms / 1e9, 1)}
        layer_ms = sum(per[n]["ms"] for n in weights)
        fused_ms = layer_ms - sum(per[n]["ms"] for n in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
        fused_ms += per["fused_qkv"]["ms"] + per["fused_gate_up"]["ms"]
        rows[b] = {
            "per_gemm": per,
            "layer_gemm_ms": round(layer_ms, 2),
            "gemm_only_prompts_per_s": round(b / (LAYERS * layer_ms / 1000), 1),
            "gemm_tflops": round(flop_per_token * m / layer_ms / 1e9, 1),
            "fused_layer_gemm_ms": round(fused_ms, 2),
            "fused_gemm_only_prompts_per_s": round(b / (LAYERS * fused_ms / 1000), 1),
        }
        log("gemm", b, {k: v for k, v in rows[b].items() if k != "per_gemm"})
    report["gemm"] = rows


def kind_of(name: str) -> str:
    low = name.lower()
    if any(k in low for k in ("gemm", "nvjet", "cutlass", "xmma", "sm90", "cublas")):
        return "gemm"
    if any(k in low for k in ("fmha", "flash", "attention", "attn", "cudnn")):
        return "attention"
    if "triton" in low:
        return "fused_elementwise"
    if "memcpy" in low or "copy" in low:
        return "copy"
    return "other"


def profile(report: Report, engine: Any, pool: list[str], batch: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    inputs = engine.tokenize(pool[:batch])
    engine.forward(inputs["input_ids"], inputs["attention_mask"])
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        engine.forward(inputs["input_ids"], inputs["attention_mask"])
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1000
    by_kind: dict[str, float] = defaultdict(float)
    top: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        device_us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        if device_us and evt.device_type == torch.autograd.DeviceType.CUDA:
            by_kind[kind_of(evt.key)] += device_us / 1000
            top[evt.key[:90]] += device_us / 1000
    busy = sum(by_kind.values())
    report["profile"] = {
        "batch": batch,
        "wall_ms_profiled": round(wall_ms, 1),
        "device_busy_ms": round(busy, 1),
        "by_kind_ms": {k: round(v, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "by_kind_share": {k: round(v / busy, 3) for k, v in by_kind.items()},
        "top_kernels_ms": {k: round(v, 1) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:15]},
    }
    log("profile", {k: v for k, v in report["profile"].items() if k != "top_kernels_ms"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sections", default="peak,gemm,engine,profile,graphs,autotune")
    args = parser.parse_args()
    report = Report(Path(args.out), "engine_profile")
    sections = set(args.sections.split(","))
    import transformers
    from flux2_client.tiny import build_tiny_tokenizer
    from flux2_encoder_server import EncoderEngine

    report["env"] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
                      "transformers": transformers.__version__, "argv": sys.argv,
                      "date": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    log(report["env"])
    tok = build_tiny_tokenizer()
    pool = prompts(64)
    full = build_encoder(False, "cuda")
    decoder = full.model.language_model
    if "peak" in sections:
        peak(report)
    if "gemm" in sections:
        with torch.inference_mode():
            gemm(report, decoder.layers[0], args.batches)
    report.save()
    engine = EncoderEngine.from_model(full, tok, compile=True)
    t0 = time.time()
    engine.encode(pool[:2])
    report["compile_first_call_s"] = round(time.time() - t0, 1)
    eager_rows = {b: engine.encode(pool[:b]) for b in args.batches}
    if "engine" in sections:
        report["engine_compiled"] = {
            b: measure(lambda b=b: engine.encode(pool[:b]), b, "cuda", args.reps) for b in args.batches
        }
        log("engine", report["engine_compiled"])
    report.save()
    if "profile" in sections:
        profile(report, engine, pool, max(args.batches))
        report.save()
    if "graphs" in sections:
        t0 = time.time()
        sizes = engine.capture_cuda_graphs([2, *args.batches])
        report["graphs_capture_s"] = round(time.time() - t0, 1)
        report["graph_sizes"] = sizes
        report["engine_compiled_graphs"] = {
            b: measure(lambda b=b: engine.encode(pool[:b]), b, "cuda", args.reps) for b in args.batches
        }
        log("graphs", report["graphs_capture_s"], report["engine_compiled_graphs"])
        same = {}
        for b in args.batches:
            same[f"batch{b}_vs_compiled_eager"] = compare(engine.encode(pool[:b]), eager_rows[b])
        # 11 prompts run padded into the 16 bucket (or the next one): the rows equal the eager batch's.
        padded = engine.encode(pool[:11])
        same["11_padded_into_bucket_vs_eager_batch"] = compare(padded, eager_rows[args.batches[0]][:11])
        alone = engine.encode(pool[:1])
        same["alone_vs_eager_batch_row0"] = compare(alone, eager_rows[args.batches[0]][:1])
        same["row0_sha_alone_eq_batch"] = row_sha(alone[0]) == row_sha(eager_rows[args.batches[0]][0])
        report["graphs_bytes"] = same
        log("graphs bytes", {k: (v["identical"] if isinstance(v, dict) else v) for k, v in same.items()})
        engine.release_cuda_graphs()
    report.save()
    if "autotune" in sections:
        b = max(args.batches)
        engine.uncompile()  # the layers are shared with `full` and `tuned`
        tuned = EncoderEngine.from_model(full, tok)
        tuned.compile(mode="max-autotune-no-cudagraphs", dynamic=False)
        t0 = time.time()
        tuned.encode(pool[:b])
        report["autotune_compile_s"] = round(time.time() - t0, 1)
        report["engine_autotuned"] = {b: measure(lambda: tuned.encode(pool[:b]), b, "cuda", args.reps)}
        report["autotuned_vs_compiled"] = compare(tuned.encode(pool[:b]), eager_rows[b])
        log("autotune", report["autotune_compile_s"], report["engine_autotuned"])
    report.save()


if __name__ == "__main__":
    main()
