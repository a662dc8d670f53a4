"""Encoder throughput, batch invariance and precision tiers, side by side in one run.

Builds Mistral Small 3.1 (FLUX.2-dev's text encoder) at its real shape with random bf16 weights directly
on the GPU, then measures in one process, on one card:

  reference  diffusers' Flux2Pipeline._get_mistral_3_small_prompt_embeds on the full 40-layer model
             (output_hidden_states=True), as the hosted endpoint and the training script call it
  engine     EncoderEngine.from_model over the same weights (first 30 layers shared, no copy):
             eager in both batching modes, then torch.compile'd
  invariance one probe prompt alone and inside batches of 2..32 (several slots), for each engine variant;
             distance to diffusers' own single-prompt call
  served     a real gRPC server on localhost over the engine, N concurrent clients in separate processes
             (one prompt per request, 512 tokens), with the sha256 of every response per prompt
  tiers      bf16 / fp8 / int8 / nf4 copies of the 30 layers: memory, prompts/s, fidelity vs bf16, and the
             relative change of a reduced-depth FLUX.2 DiT's output for one step fed with each embedding

    python bench/encoder_throughput.py --out results/            # on the GPU machine
    python bench/encoder_throughput.py --tiny --device cpu        # quick check of the script itself

Tokens come from a byte-level tokenizer with Tekken's special ids (flux2_client.tiny): every prompt is
padded to 512 tokens, so the work per prompt is the real one whatever the vocabulary.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import build_dit, build_encoder, prompts
from serving_cpu import NullEngine  # the same no-model engine as the CPU serving benchmark

RESULTS: dict[str, Any] = {}
OUT: Path = Path(".")
GIB = 1 << 30


def log(*args: Any) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


def save() -> None:
    (OUT / "encoder_throughput.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn: Callable[[], Any], batch: int, device: str, reps: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time of fn() (host synchronised), prompts/s, and the peak device memory it added."""
    for _ in range(warmup):
        fn()
    sync(device)
    gc.collect()
    base = 0
    if device.startswith("cuda"):
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    row = {"batch": batch, "latency_s": med, "prompts_per_s": batch / med, "min_s": min(times), "max_s": max(times)}
    if device.startswith("cuda"):
        row["peak_activation_gib"] = (torch.cuda.max_memory_allocated() - base) / GIB
    return row


def compare(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    g, w = got.double().flatten(), want.double().flatten()
    return {
        "identical": bool(torch.equal(got, want)),
        "rel_err": float((g - w).norm() / w.norm()),
        "cosine": float(torch.nn.functional.cosine_similarity(g, w, dim=0)),
        "frac_elements_differ": float((got != want).float().mean()),
        "max_abs": float((g - w).abs().max()),
    }


def row_sha(row: torch.Tensor) -> str:
    return hashlib.sha256(row.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


@contextlib.contextmanager
def section(name: str):
    log(f"== {name}")
    t0 = time.time()
    try:
        yield
    except Exception as exc:
        RESULTS.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        RESULTS.setdefault("section_seconds", {})[name] = round(time.time() - t0, 1)
        save()


# --- sections --------------------------------------------------------------------------------------------


def bench_reference(full: Any, tok: Any, pool: list[str], args: argparse.Namespace) -> dict[int, torch.Tensor]:
    from diffusers import Flux2Pipeline

    dev = torch.device(args.device)

    def call(batch_prompts: list[str]) -> torch.Tensor:
        embeds = Flux2Pipeline._get_mistral_3_small_prompt_embeds(
            text_encoder=full, tokenizer=tok, prompt=batch_prompts, device=dev
        )
        return embeds.cpu()  # what the hosted endpoint did before torch.save

    rows = []
    for b in args.batches:
        rows.append(measure(lambda b=b: call(pool[:b]), b, args.device, args.reps))
        log("reference", rows[-1])
    RESULTS["reference"] = rows
    # diffusers' own single-prompt calls for the probes: the bytes a user of Flux2Pipeline gets.
    return {i: call([pool[i]]) for i in args.probes}


def bench_engine(engine: Any, pool: list[str], args: argparse.Namespace, key: str) -> None:
    rows = []
    for b in args.batches:
        rows.append(measure(lambda b=b: engine.encode(pool[:b]), b, args.device, args.reps))
        log(key, rows[-1])
    RESULTS[key] = rows


def invariance(engine: Any, pool: list[str], diffusers_single: dict[int, torch.Tensor], key: str) -> None:
    """A probe prompt alone vs inside batches of 2..32 at several slots, and vs diffusers' single call."""
    out: dict[str, Any] = {}
    for probe in diffusers_single:
        alone = engine.encode([pool[probe]])
        others = [p for i, p in enumerate(pool) if i != probe]
        cases = {}
        for size in (2, 3, 4, 8, 16, 32):
            for slot in sorted({0, size - 1, size // 2}):
                batch = others[: size - 1]
                batch.insert(slot, pool[probe])
                row = engine.encode(batch)[slot : slot + 1]
                cases[f"B{size}_slot{slot}"] = compare(row, alone)
        in_batch = engine.encode([pool[probe], *others[:7]])[:1]
        out[f"probe{probe}"] = {
            "alone_vs_batches": cases,
            "all_batches_identical_to_alone": all(c["identical"] for c in cases.values()),
            "all_batches_identical_to_each_other": len(
                {row_sha(engine.encode([*others[:k], pool[probe]])[k]) for k in (1, 3, 7)}
            )
            == 1,
            "alone_vs_diffusers_single": compare(alone, diffusers_single[probe]),
            "batch8_vs_diffusers_single": compare(in_batch, diffusers_single[probe]),
        }
        log(key, f"probe{probe}", {k: v["identical"] for k, v in cases.items()})
        log(key, "alone vs diffusers", out[f"probe{probe}"]["alone_vs_diffusers_single"])
    RESULTS[key] = out


def serve(
    engine: Any,
    pool: list[str],
    args: argparse.Namespace,
    key: str,
    patterns: list[tuple[int, float]],
    switch_interval_s: float | None = None,
    chunk_bytes: int = 1 << 20,
    legacy_chunks: bool = False,
    pipeline_depth: int = 2,
    max_batch: int | None = None,
) -> None:
    """Real gRPC server in this process; clients in `ceil(N/8)` processes; one prompt per request.
    `legacy_chunks`: stream chunks the way the server did before pre-serialized chunk bytes (A/B runs)."""
    import asyncio
    import contextlib
    import threading

    from _serving_variants import legacy_chunks as legacy_chunk_path
    from flux2_encoder_server import EncoderServer, Settings

    settings = Settings(
        model="random-init",
        host="127.0.0.1",
        port=0,
        device=args.device,
        warmup=False,
        max_batch_prompts=max_batch or args.max_batch,
        max_wait_ms=args.max_wait_ms,
        pipeline_depth=pipeline_depth,
        max_queued_requests=1024,
        chunk_bytes=chunk_bytes,
        cache_bytes=0,  # every request must reach the model (the pool repeats prompts)
    )
    previous_switch = sys.getswitchinterval()
    if switch_interval_s is not None:
        sys.setswitchinterval(switch_interval_s)
    # Time every model batch the server runs: (prompts, launched, done, seconds spent launching). A batch
    # that takes longer served than alone means the device waited for the host (e.g. the GIL).
    batch_times: list[tuple[int, float, float, float]] = []
    plain_launch = engine.launch

    # With --keep-model-rows: every distinct row the model produced per prompt (up to 3), to tell whether
    # two hashes seen by clients were two different model outputs, and how they differ.
    model_rows: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)

    class TimedHandle:
        def __init__(self, handle: Any, prompts: list[str], t0: float, launch_s: float):
            self.handle, self.prompts, self.t0, self.launch_s = handle, prompts, t0, launch_s

        def result(self) -> Any:
            rows = self.handle if isinstance(self.handle, torch.Tensor) else self.handle.result()
            batch_times.append((len(self.prompts), self.t0, time.perf_counter(), self.launch_s))
            if args.keep_model_rows:
                for prompt, row in zip(self.prompts, rows, strict=True):
                    seen = model_rows[prompt]
                    sha = row_sha(row)
                    if sha not in seen and len(seen) < 3:
                        seen[sha] = row.clone()
            return rows

    def timed_launch(prompts: list[str]) -> Any:
        t0 = time.perf_counter()
        handle = plain_launch(prompts)
        return TimedHandle(handle, list(prompts), t0, time.perf_counter() - t0)

    def model_seconds() -> list[float]:
        # A pipelined batch's model time starts when the one before it finished, not when it was launched.
        spans, previous_end = [], 0.0
        for _, t0, t1, _ in sorted(batch_times, key=lambda t: t[2]):
            spans.append(t1 - max(t0, previous_end))
            previous_end = t1
        return spans

    engine.launch = timed_launch
    server = EncoderServer(settings, lambda _s: engine)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(600)

    port = run(server.start())
    run(server.load())
    # The same model call alone (no serving running), through the same wrapper, for comparison.
    alone = []
    for _ in range(3):
        batch_times.clear()
        engine.launch(pool[:16]).result()
        alone.append(batch_times[0][2] - batch_times[0][1])
    target = f"127.0.0.1:{port}"
    pool_file = Path(tempfile.mkdtemp()) / "pool.json"
    pool_file.write_text(json.dumps(pool))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    results: dict[str, Any] = {}
    hashes_all: dict[int, set[str]] = defaultdict(set)
    variant = legacy_chunk_path() if legacy_chunks else contextlib.nullcontext()
    variant.__enter__()
    try:
        for clients, seconds in patterns:
            engine.batch_sizes.clear()
            batch_times.clear()
            start_at = time.time() + args.client_startup_s
            stop_at = start_at + seconds
            per_proc = args.threads_per_process
            procs = []
            for first in range(0, clients, per_proc):
                n = min(per_proc, clients - first)
                cmd = [sys.executable, str(Path(__file__).parent / "_load_clients.py"), "--target", target,
                       "--threads", str(n), "--prompts", str(pool_file), "--start-at", str(start_at),
                       "--stop-at", str(stop_at), "--first-thread", str(first)]  # fmt: skip
                procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env))
            records, errors = [], 0
            while time.time() < start_at:
                time.sleep(0.01)
            t0, cpu0 = time.time(), _process_cpu_s()
            for p in procs:
                data = json.loads(p.communicate(timeout=seconds + args.client_startup_s + 300)[0])
                records += data["records"]
                errors += data["error_count"]
                if data["errors"]:
                    log("client errors", data["errors"][:3])
            cpu_used = _process_cpu_s() - cpu0
            # Steady state: requests that started after the first second and ended before stop_at.
            lo = start_at + min(2.0, seconds / 4)
            window = [r for r in records if r[0] >= lo and r[1] <= stop_at]
            span = stop_at - lo
            lat = sorted(r[1] - r[0] for r in window)
            per_prompt: dict[int, set[str]] = defaultdict(set)
            for r in records:
                per_prompt[r[2]].add(r[3])
                hashes_all[r[2]].add(r[3])
            row = {
                "clients": clients,
                "seconds": seconds,
                "requests": len(records),
                "errors": errors,
                "prompts_per_s": len(window) / span if span > 0 else 0.0,
                # Completions per second in the same window (requests that ended in it, whenever they
                # started): the steady-state rate without the edge loss of the row above, which drops
                # about one latency's worth of requests at the window's end.
                "completions_per_s": sum(lo <= r[1] <= stop_at for r in records) / span if span > 0 else 0.0,
                "server_cpu_ms_per_prompt": round(
                    1000 * cpu_used / max(1, sum(t0 <= r[1] <= stop_at for r in records)), 2
                ),
                "latency_median_s": lat[len(lat) // 2] if lat else None,
                "latency_p90_s": lat[int(len(lat) * 0.9)] if lat else None,
                "model_batch_sizes": dict(sorted(engine.batch_sizes.items())),
                "prompts_with_more_than_one_hash": sum(len(h) > 1 for h in per_prompt.values()),
                "distinct_prompts": len(per_prompt),
                "batching_mode_in_header": sorted({r[4] for r in records}),
                # Served model calls: ms per prompt inside the batch (compare with the engine rows).
                "model_ms_per_prompt_served": round(
                    1000 * sum(model_seconds()) / max(1, sum(n for n, *_ in batch_times)), 2
                ),
                "model_busy_fraction": round(sum(model_seconds()) / seconds, 3),
                "launch_ms_per_batch": round(1000 * statistics.mean(t[3] for t in batch_times), 1)
                if batch_times
                else None,
            }
            if args.keep_model_rows:
                row["model_rows"] = model_row_report(model_rows, per_prompt, pool)
                model_rows.clear()
            results[f"{clients}_clients"] = row
            log(key, row)
    finally:
        vars(engine).pop("launch", None)
        variant.__exit__(None, None, None)
        run(server.stop(0))
        loop.call_soon_threadsafe(loop.stop)
        sys.setswitchinterval(previous_switch)
    # The served bytes against the engine's own output for the same prompts (reproducible: batches >= 2).
    seen = sorted(hashes_all)
    engine_hash = {}
    for i in range(0, len(seen), 16):
        chunk = seen[i : i + 16]
        embeds = engine.encode([pool[j] for j in chunk])
        engine_hash.update({j: row_sha(embeds[k]) for k, j in enumerate(chunk)})
    results["prompts_over_all_patterns_with_more_than_one_hash"] = sum(len(h) > 1 for h in hashes_all.values())
    results["prompts_served_equal_to_engine_batch"] = sum(hashes_all[j] == {engine_hash[j]} for j in seen)
    results["distinct_prompts"] = len(seen)
    results["switch_interval_s"] = switch_interval_s or previous_switch
    results["chunk_bytes"] = chunk_bytes
    results["model_ms_per_prompt_alone_b16"] = round(1000 * statistics.median(alone) / 16, 2)
    results["chunks"] = "legacy protobuf-built" if legacy_chunks else "pre-serialized"
    results["threads_per_process"] = args.threads_per_process
    results["pipeline_depth"] = pipeline_depth
    results["max_batch_prompts"] = max_batch or args.max_batch
    results["cuda_graph_sizes"] = list(engine._graphs.batch_sizes) if getattr(engine, "_graphs", None) else []
    RESULTS[key] = results


def model_row_report(
    model_rows: dict[str, dict[str, torch.Tensor]], client_hashes: dict[int, set[str]], pool: list[str]
) -> dict[str, Any]:
    """Did the model itself produce two different rows for a prompt, and where do they differ?"""
    report: dict[str, Any] = {"prompts_with_more_than_one_model_row": 0, "differences": []}
    for rows in model_rows.values():
        if len(rows) < 2:
            continue
        report["prompts_with_more_than_one_model_row"] += 1
        first, *others = rows.values()
        for other in others:
            differ = (first != other).any(dim=-1)  # per token position
            cols = (first != other).any(dim=0).nonzero().flatten()
            report["differences"].append({
                **compare(other, first),
                "token_positions_differing": int(differ.sum()),
                "first_last_position": [int(differ.nonzero().min()), int(differ.nonzero().max())],
                "columns_differing": int(cols.numel()),
                "column_blocks": sorted({int(c) // (first.shape[-1] // 3) for c in cols.tolist()}),
            })  # fmt: skip
    model_hashes = {pool.index(p): set(rows) for p, rows in model_rows.items()}
    report["client_hashes_not_from_the_model"] = sum(
        len(h - model_hashes.get(i, set())) for i, h in client_hashes.items()
    )
    return report


def _process_cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def ab_sweep(engine: Any, pool: list[str], args: argparse.Namespace, key: str, one: list[tuple[int, float]]) -> None:
    """Before/after in one run: the legacy chunk path at 1 ms, then pre-serialized chunks at each
    `--ab-switch-ms` GIL switch interval, then pre-serialized with 3 MiB chunks at the first of them."""
    # An untimed 4 s of the same load first (its row is overwritten): batch sizes not seen yet
    # would otherwise trigger torch.compile work inside the first measured window.
    warm = [(args.clients, 4.0)]
    serve(engine, pool, args, f"{key}_legacy_switch1ms", [*warm, *one], 0.001, legacy_chunks=True)
    for ms in args.ab_switch_ms:
        serve(engine, pool, args, f"{key}_preserialized_switch{ms:g}ms", one, ms / 1000)
    if args.ab_3mib:
        ms = args.ab_switch_ms[0]
        serve(engine, pool, args, f"{key}_preserialized_switch{ms:g}ms_chunk3MiB", one, ms / 1000, 3 << 20)
    if args.ab_load:  # is it the closed loop of 32 clients, or the clients' own processes?
        ms = args.ab_switch_ms[-1]
        twice = [(2 * args.clients, args.served_seconds)]
        serve(engine, pool, args, f"{key}_preserialized_switch{ms:g}ms_x2clients", twice, ms / 1000)
        per_proc, args.threads_per_process = args.threads_per_process, 2
        serve(engine, pool, args, f"{key}_preserialized_switch{ms:g}ms_2threads_per_process", one, ms / 1000)
        args.threads_per_process = per_proc


def pipeline_ab(full: Any, tok: Any, pool: list[str], args: argparse.Namespace) -> None:
    """Served throughput, same run, one row per `--pipeline-rows` spec PRECISION/PATH/DEPTH/MAXBATCH/CLIENTS/TPP
    (PATH eager or graphs; DEPTH 1 = one batch at a time, 2 = next batch launched while one runs; TPP =
    client threads per load process), e.g. bf16/graphs/2/16/32/8. Rows of one precision share its engine;
    the first row of each engine path is preceded by 4 untimed seconds of load (compiles batch sizes)."""
    from flux2_encoder_server import EncoderEngine
    from flux2_encoder_server.cuda_graphs import graph_batch_sizes

    specs = [spec.split("/") for spec in args.pipeline_rows]
    for precision in dict.fromkeys(spec[0] for spec in specs):
        engine = EncoderEngine.from_model(full, tok, precision=precision, compile=True)
        engine.encode(pool[:2])
        bench_engine(engine, pool, args, f"engine_compiled_{precision}")
        if args.slot_sweep:
            slot_invariance(engine, pool, f"slot_invariance_compiled_eager_{precision}")
        warmed: set[str] = set()
        for _, path, depth, max_batch, clients, tpp in (s for s in specs if s[0] == precision):
            if path == "graphs" and engine._graphs is None:
                t0 = time.time()
                sizes = engine.capture_cuda_graphs(graph_batch_sizes(32, engine.min_batch))
                RESULTS[f"graphs_capture_s_{precision}"] = {"seconds": round(time.time() - t0, 1), "sizes": sizes}
                bench_engine(engine, pool, args, f"engine_compiled_graphs_{precision}")
                graph_invariance(engine, pool, f"graph_buckets_invariance_{precision}")
                if args.slot_sweep:
                    slot_invariance(engine, pool, f"slot_invariance_compiled_graphs_{precision}")
            if path == "eager":
                engine._graphs = None
            load = [(int(clients), args.served_seconds)]
            if path not in warmed:
                load.insert(0, (int(clients), 4.0))
                warmed.add(path)
            per_proc, args.threads_per_process = args.threads_per_process, int(tpp)
            key = f"served_{precision}_compiled_{path}_depth{depth}_mb{max_batch}_{clients}clients_{tpp}tpp"
            serve(engine, pool, args, key, load, 0.001, pipeline_depth=int(depth), max_batch=int(max_batch))
            args.threads_per_process = per_proc
        engine._graphs = None
        for layer in engine.decoder.layers:  # bf16 layers are shared with `full`: give back the eager forward
            vars(layer).pop("forward", None)
        del engine
        gc.collect()
        torch.cuda.empty_cache()


def slot_invariance(engine: Any, pool: list[str], key: str, sizes: tuple[int, ...] = (2, 4, 8, 16, 24, 32)) -> None:
    """The probe prompt at every slot of batches of each size (other rows from the pool) vs alone."""
    probe = pool[0]
    alone = row_sha(engine.encode([probe])[0])
    differ: dict[str, list[int]] = {}
    for size in sizes:
        bad = []
        for slot in range(size):
            others = pool[1:size]
            batch = [*others[:slot], probe, *others[slot:]]
            if row_sha(engine.encode(batch)[slot]) != alone:
                bad.append(slot)
        differ[str(size)] = bad
    RESULTS[key] = {"slots_differing_from_alone": differ, "cases": sum(sizes),
                    "identical_cases": sum(sizes) - sum(len(v) for v in differ.values())}  # fmt: skip
    log(key, RESULTS[key])


def graph_invariance(engine: Any, pool: list[str], key: str) -> None:
    """A probe prompt alone (bucket 2) and inside a full batch of every captured size: same bytes?"""
    probe = pool[0]
    alone = row_sha(engine.encode([probe])[0])
    RESULTS[key] = {
        str(size): row_sha(engine.encode([probe, *pool[1:size]])[0]) == alone for size in engine._graphs.batch_sizes
    }
    log(key, RESULTS[key])


def ceiling(tok: Any, pool: list[str], args: argparse.Namespace) -> None:
    """The serving path alone: a null engine that answers at once."""
    with section("ceiling"):
        null = NullEngine(192 if args.tiny else 15360)
        one = [(args.clients, args.served_seconds)]
        if args.ab:
            ab_sweep(null, pool, args, "served_null", one)
            return
        serve(null, pool, args, "served_null_engine_switch1ms", one, switch_interval_s=0.001)
        per_proc, args.threads_per_process = args.threads_per_process, 2
        serve(null, pool, args, "served_null_engine_switch1ms_2threads_per_process", one, 0.001)
        args.threads_per_process = per_proc


def bench_tiers(
    full: Any, tok: Any, pool: list[str], args: argparse.Namespace, bf16_engine: Any
) -> dict[str, torch.Tensor]:
    from flux2_encoder_server import EncoderEngine
    from flux2_encoder_server.precision import module_bytes

    fid_prompts = pool[:8]
    bf16_ref = bf16_engine.encode(fid_prompts)
    embeds_for_dit = {"bf16": bf16_ref[:1].clone()}
    rows = {}
    for precision in args.tiers:
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        t0 = time.time()
        engine = bf16_engine if precision == "bf16" else EncoderEngine.from_model(full, tok, precision=precision)
        build_s = time.time() - t0
        try:
            row: dict[str, Any] = {"build_s": round(build_s, 1)}
            row["weights_gib"] = module_bytes(engine.decoder) / GIB
            row.update(measure(lambda e=engine: e.encode(pool[: args.tier_batch]), args.tier_batch, args.device, 2))
            got = engine.encode(fid_prompts)
            per = [compare(got[i], bf16_ref[i]) for i in range(len(fid_prompts))]
            row["rel_err_mean"] = statistics.mean(p["rel_err"] for p in per)
            row["rel_err_max"] = max(p["rel_err"] for p in per)
            row["cosine_mean"] = statistics.mean(p["cosine"] for p in per)
            row["cosine_min"] = min(p["cosine"] for p in per)
            width = got.shape[-1] // 3
            row["rel_err_by_layer"] = {
                layer: compare(got[..., i * width : (i + 1) * width], bf16_ref[..., i * width : (i + 1) * width])[
                    "rel_err"
                ]
                for i, layer in enumerate(("10", "20", "30"))
            }
            embeds_for_dit[precision] = got[:1].clone()
            rows[precision] = row
            log("tier", precision, row)
        finally:
            if engine is not bf16_engine:
                del engine
    RESULTS["tiers"] = rows
    return embeds_for_dit


def dit_fidelity(embeds: dict[str, torch.Tensor], args: argparse.Namespace) -> None:
    from diffusers import Flux2Pipeline

    dit = build_dit(args.tiny, args.device)
    dev = torch.device(args.device)
    side = 64 if not args.tiny else 8  # 1024 px -> 64 x 64 packed latent tokens
    gen = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(1, 128, side, side, generator=gen).to(dev, torch.bfloat16)
    img_ids = Flux2Pipeline._prepare_latent_ids(latents).to(dev)
    packed = Flux2Pipeline._pack_latents(latents)

    def step(e: torch.Tensor) -> torch.Tensor:
        e = e.to(dev)
        with torch.inference_mode():
            out = dit(
                hidden_states=packed,
                encoder_hidden_states=e,
                timestep=torch.tensor([0.5], device=dev),
                guidance=torch.tensor([4.0], device=dev),
                img_ids=img_ids,
                txt_ids=Flux2Pipeline._prepare_text_ids(e).to(dev),
                return_dict=False,
            )[0]
        return out.float().cpu()

    base = step(embeds["bf16"])
    rows = {}
    for name, e in embeds.items():
        out = step(e)
        rows[name] = {"dit_rel_change": float((out - base).norm() / base.norm())}
    rows["_note"] = "FLUX.2 DiT, real width, 2 double + 4 single blocks (real: 8 + 48), random weights, 1024 px, t=0.5"
    RESULTS["dit_one_step"] = rows
    log("dit", rows)


def main() -> None:
    global OUT
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy shapes, for checking the script on a CPU")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=".")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--probes", type=int, nargs="+", default=[0, 5])
    parser.add_argument("--sections", default="reference,engine,invariance,served,tiers,dit,compile")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--served-seconds", type=float, default=20.0)
    parser.add_argument("--client-startup-s", type=float, default=8.0)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--tiers", nargs="+", default=["bf16", "fp8", "int8", "nf4"])
    parser.add_argument("--tier-batch", type=int, default=16)
    parser.add_argument("--serve-compiled", action="store_true", help="serve the torch.compile'd engine")
    parser.add_argument(
        "--ab", action="store_true", help="served rows twice: legacy protobuf-built chunks, then pre-serialized"
    )
    parser.add_argument("--ab-switch-ms", type=float, nargs="+", default=[1.0, 0.2, 0.05])
    parser.add_argument("--ab-3mib", action="store_true", help="with --ab: also 3 MiB chunks")
    parser.add_argument("--ab-load", action="store_true", help="with --ab: also 2x clients, 2 threads/process")
    parser.add_argument("--keep-model-rows", action="store_true", help="served rows: keep and compare model outputs")
    parser.add_argument("--slot-sweep", action="store_true", help="pipeline section: probe at every slot")
    parser.add_argument(
        "--pipeline-rows",
        nargs="+",
        default=["bf16/eager/1/32/32/8", "bf16/eager/2/16/32/8", "bf16/graphs/2/16/32/8", "fp8/graphs/2/16/32/8"],
        help="served rows of the pipeline section: PRECISION/PATH/DEPTH/MAXBATCH/CLIENTS/TPP",
    )
    parser.add_argument("--threads-per-process", type=int, default=8, help="client threads per load process")
    args = parser.parse_args()
    OUT = Path(args.out)
    OUT.mkdir(parents=True, exist_ok=True)
    sections = set(args.sections.split(","))

    from flux2_client.tiny import build_tiny_tokenizer
    from flux2_encoder_server import EncoderEngine
    from flux2_encoder_server.precision import module_bytes

    env = {"torch": torch.__version__, "argv": sys.argv, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    import diffusers
    import transformers

    env["transformers"] = transformers.__version__
    env["diffusers"] = diffusers.__version__
    RESULTS["env"] = env
    log(env)

    tok = build_tiny_tokenizer()
    pool = prompts(64)
    lengths = [int(m.sum()) for m in tok.apply_chat_template(
        [[{"role": "system", "content": [{"type": "text", "text": "x" * 170}]},
          {"role": "user", "content": [{"type": "text", "text": p}]}] for p in pool],
        tokenize=True, return_dict=True, return_tensors="pt", padding="max_length", truncation=True,
        max_length=512)["attention_mask"]]  # fmt: skip
    RESULTS["prompt_tokens"] = {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)}

    if sections == {"ceiling"}:
        ceiling(tok, pool, args)
        print_tables()
        return

    t0 = time.time()
    full = build_encoder(args.tiny, args.device)
    sync(args.device)
    RESULTS["model"] = {
        "build_s": round(time.time() - t0, 1),
        "full_model_gib": module_bytes(full) / GIB,
        "attn_implementation": getattr(full.config.text_config, "_attn_implementation", None),
    }
    log("model", RESULTS["model"])
    save()

    diffusers_single: dict[int, torch.Tensor] = {}
    if "reference" in sections:
        with section("reference"):
            diffusers_single = bench_reference(full, tok, pool, args)

    repro = EncoderEngine.from_model(full, tok, batching_mode="reproducible")
    dynamic = EncoderEngine.from_model(full, tok, batching_mode="dynamic")
    RESULTS["model"]["engine_weights_gib"] = module_bytes(repro.decoder) / GIB
    if "engine" in sections:
        with section("engine"):
            bench_engine(dynamic, pool, args, "engine_eager_dynamic")
            bench_engine(repro, pool, args, "engine_eager_reproducible")
    if "invariance" in sections and diffusers_single:
        with section("invariance"):
            invariance(dynamic, pool, diffusers_single, "invariance_eager_dynamic")
            invariance(repro, pool, diffusers_single, "invariance_eager_reproducible")
    if "served" in sections and not args.serve_compiled:
        with section("served"):
            patterns = [(args.clients, args.served_seconds), (1, 4.0), (5, 4.0)]
            serve(repro, pool, args, "served_eager_reproducible", patterns)
            serve(dynamic, pool, args, "served_eager_dynamic", [(args.clients, 8.0), (1, 4.0)])
    embeds_for_dit: dict[str, torch.Tensor] = {}
    if "tiers" in sections:
        with section("tiers"):
            embeds_for_dit = bench_tiers(full, tok, pool, args, repro)
    if "compile" in sections:
        with section("compile"):
            eager_embeds = repro.encode(pool[:8])  # before compiling: the layers are shared
            t0 = time.time()
            compiled = EncoderEngine.from_model(full, tok, batching_mode="reproducible", compile=True)
            compiled.encode(pool[:2])
            sync(args.device)
            RESULTS["compile_first_call_s"] = round(time.time() - t0, 1)
            log("compiled first call", RESULTS["compile_first_call_s"])
            bench_engine(compiled, pool, args, "engine_compiled_reproducible")
            if diffusers_single:
                invariance(compiled, pool, diffusers_single, "invariance_compiled_reproducible")
            embeds_for_dit["bf16_compiled"] = compiled.encode(pool[:8])[:1].clone()
            RESULTS["compiled_vs_eager"] = compare(compiled.encode(pool[:8]), eager_embeds)
            if "served" in sections and args.serve_compiled:
                one = [(args.clients, args.served_seconds)]
                if args.ab:  # before/after of the chunk path, same engine, same run
                    ab_sweep(compiled, pool, args, "served_compiled", one)
                else:
                    serve(compiled, pool, args, "served_compiled_reproducible", [*one, (1, 4.0)])
                    serve(compiled, pool, args, "served_compiled_switch1ms", one, switch_interval_s=0.001)
                    serve(compiled, pool, args, "served_compiled_switch1ms_chunk3MiB", one, 0.001, 3 << 20)
    if "pipeline" in sections:
        with section("pipeline"):
            pipeline_ab(full, tok, pool, args)
    if "fp8" in sections:
        with section("fp8"):
            with contextlib.suppress(NameError):
                for layer in compiled.decoder.layers:  # give the shared bf16 layers their eager forward back
                    vars(layer).pop("forward", None)
            fp8 = EncoderEngine.from_model(full, tok, precision="fp8", compile=True)
            fp8.encode(pool[:2])
            bench_engine(fp8, pool, args, "engine_compiled_fp8_reproducible")
            if "served" in sections:
                one = [(args.clients, args.served_seconds)]
                if args.ab:
                    ab_sweep(fp8, pool, args, "served_compiled_fp8", one)
                else:
                    serve(fp8, pool, args, "served_compiled_fp8_switch1ms", one, 0.001)
            del fp8
    if "ceiling" in sections:  # after the model rows, which matter more if the call runs out of time
        ceiling(tok, pool, args)
    if diffusers_single and embeds_for_dit:
        embeds_for_dit["diffusers_single_B1"] = diffusers_single[args.probes[0]]
    if "dit" in sections and embeds_for_dit:
        with section("dit"):
            # Free the encoder first: the DiT needs the room.
            del repro, dynamic, full
            with contextlib.suppress(NameError):
                del compiled
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            dit_fidelity(embeds_for_dit, args)
    save()
    print_tables()


def print_tables() -> None:
    r = RESULTS
    print("\n### results (" + str(r["env"].get("gpu", "cpu")) + ")")
    for key in [k for k in r if k == "reference" or k.startswith("engine_")]:
        if key in r:
            cells = " | ".join(f"B{x['batch']}: {x['prompts_per_s']:.2f}/s {x['latency_s'] * 1000:.0f}ms "
                               f"+{x.get('peak_activation_gib', 0):.1f}GiB" for x in r[key])  # fmt: skip
            print(f"{key}: {cells}")
    for key in [k for k in r if k.startswith("served_")]:
        if key in r:
            for name, row in r[key].items():
                if isinstance(row, dict):
                    print(f"{key} {name}: {row['prompts_per_s']:.2f}/s p50 {row['latency_median_s']} "
                          f"batches {row['model_batch_sizes']} "
                          f"multi-hash {row['prompts_with_more_than_one_hash']}")  # fmt: skip
            print(f"{key}: { ({k: v for k, v in r[key].items() if not isinstance(v, dict)}) }")
    for key in [k for k in r if k.startswith("invariance")]:
        for probe, v in r[key].items():
            print(f"{key} {probe}: batches==alone {v['all_batches_identical_to_alone']} "
                  f"alone-vs-diffusers {v['alone_vs_diffusers_single']['rel_err']:.4g} "
                  f"batch-vs-diffusers {v['batch8_vs_diffusers_single']['rel_err']:.4g}")  # fmt: skip
    for name, row in r.get("tiers", {}).items():
        print(f"tier {name}: {row['weights_gib']:.1f}GiB {row['prompts_per_s']:.2f}/s rel {row['rel_err_mean']:.4g} "
              f"cos {row['cosine_min']:.5f}")  # fmt: skip
    if "dit_one_step" in r:
        print("dit", {k: v for k, v in r["dit_one_step"].items()})
    if "errors" in r:
        print("ERRORS", r["errors"])
    print("memory", r.get("model"), "compiled_vs_eager", r.get("compiled_vs_eager"))


if __name__ == "__main__":
    main()
