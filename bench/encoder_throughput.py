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

    python -m bench.encoder_throughput --out results/            # on the GPU machine
    python -m bench.encoder_throughput --tiny --device cpu        # quick check of the script itself
    python -m bench.encoder_throughput --encoder qwen3-4b --sections reference,engine,served --out results/

`--encoder qwen3-4b|qwen3-8b` measures a FLUX.2 [klein] text encoder (Qwen3-4B for klein 4B, Qwen3-8B for
klein 9B) the same way: the reference is diffusers' Flux2KleinPipeline._get_qwen3_prompt_embeds on the whole
36-layer model, the engine keeps layers 0..26 (hidden states 9, 18, 27). The `dit` section is FLUX.2-dev's
only.

(from the repository root; the server in `served` is `flux2_encoder_server.testing.ServerThread` over the
engine wrapped in `FakeEngine`, which times every batch the server runs)

Tokens come from a byte-level tokenizer with Tekken's special ids (flux2_client.tiny): every prompt is
padded to 512 tokens, so the work per prompt is the real one whatever the vocabulary.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ._measure import GIB, Report, compare, log, measure, process_cpu_s, row_sha, sync, system_cpu_jiffies
from ._models import ENCODERS, build_dit, build_encoder, build_qwen3_encoder, prompts
from ._timeline import AccessLogStages, DeviceTimeline

REPO_ROOT = Path(__file__).resolve().parents[1]


# --- sections --------------------------------------------------------------------------------------------
def is_klein(args: argparse.Namespace) -> bool:
    """A FLUX.2 [klein] encoder (Qwen3) rather than FLUX.2-dev's Mistral."""
    return bool(args.encoder.startswith("qwen3"))


def embedding_width(args: argparse.Namespace) -> int:
    if args.tiny:
        return 384 if is_klein(args) else 192
    return {"mistral-small-3.1": 15360, "qwen3-4b": 7680, "qwen3-8b": 12288}[args.encoder]


def bench_reference(
    report: Report, full: Any, tok: Any, pool: list[str], args: argparse.Namespace
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    from diffusers import Flux2Pipeline

    dev = torch.device(args.device)

    def call(batch_prompts: list[str]) -> torch.Tensor:
        if is_klein(args):
            from diffusers import Flux2KleinPipeline

            embeds = Flux2KleinPipeline._get_qwen3_prompt_embeds(
                text_encoder=full, tokenizer=tok, prompt=batch_prompts, device=dev
            )
        else:
            embeds = Flux2Pipeline._get_mistral_3_small_prompt_embeds(
                text_encoder=full, tokenizer=tok, prompt=batch_prompts, device=dev
            )
        return embeds.cpu()  # what the hosted endpoint did before torch.save

    rows = []
    for b in args.batches:
        rows.append(measure(lambda b=b: call(pool[:b]), b, args.device, args.reps))
        log("reference", rows[-1])
    report["reference"] = rows
    # diffusers' own single-prompt calls for the probes: the bytes a user of Flux2Pipeline gets; and its
    # call on the largest batch, the bytes the engines must equal (engine_vs_diffusers).
    return {i: call([pool[i]]) for i in args.probes}, call(pool[: max(args.batches)])


def engine_vs_diffusers(report: Report, engines: dict[str, Any], pool: list[str], want: torch.Tensor) -> None:
    """Each engine on the largest batch vs diffusers' own call on the same prompts (the whole model,
    `output_hidden_states`): the pruned engines must give the same bytes (dynamic mode: diffusers'
    batching; reproducible mode: equal too wherever the batch's kernels do not depend on its size)."""
    out = {}
    for key, engine in engines.items():
        out[key] = compare(engine.encode(pool[: want.shape[0]]), want)
        log("engine_vs_diffusers", key, out[key])
    report["engine_vs_diffusers"] = out


def bench_engine(report: Report, engine: Any, pool: list[str], args: argparse.Namespace, key: str) -> None:
    rows = []
    for b in args.batches:
        rows.append(measure(lambda b=b: engine.encode(pool[:b]), b, args.device, args.reps))
        log(key, rows[-1])
    report[key] = rows


def invariance(
    report: Report, engine: Any, pool: list[str], diffusers_single: dict[int, torch.Tensor], key: str
) -> None:
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
    report[key] = out


def serve(
    report: Report,
    engine: Any,
    pool: list[str],
    args: argparse.Namespace,
    key: str,
    patterns: list[tuple[int, float]],
    switch_interval_s: float | None = None,
    chunk_bytes: int = 1 << 20,
    pipeline_depth: int = 2,
    max_batch: int | None = None,
    threads_per_process: int | None = None,
    frontends: int = 0,
) -> None:
    """Real gRPC server in this process (with `frontends` > 0: this process is the model process and the
    gRPC front-ends are that many processes of their own, `--frontends`); clients in
    `ceil(N / threads_per_process)` processes; one prompt per request. Every model batch the server runs is
    timed by the FakeEngine around `engine` (launch, answer, host time spent launching): a batch that takes
    longer served than alone means the device waited for the host (e.g. the GIL)."""
    from flux2_encoder_server.testing import FakeEngine, ServerThread, local_settings

    per_proc = threads_per_process or args.threads_per_process
    settings = local_settings(
        "random-init",
        device=args.device,
        max_batch_prompts=max_batch or args.max_batch,
        max_wait_ms=args.max_wait_ms,
        launch_lead_ms=args.launch_lead_ms,
        balance_batches=args.balance_batches,
        pipeline_depth=pipeline_depth,
        max_queued_requests=1024,
        chunk_bytes=chunk_bytes,
        cache_bytes=0,  # every request must reach the model (the pool repeats prompts)
        **({"frontends": frontends} if frontends else {}),
    )
    previous_switch = sys.getswitchinterval()
    if switch_interval_s is not None:
        sys.setswitchinterval(switch_interval_s)
    # With --keep-model-rows: every distinct row the model produced per prompt (up to 3), to tell whether
    # two hashes seen by clients were two different model outputs, and how they differ.
    model_rows: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)

    def keep_rows(prompts: list[str], rows: torch.Tensor) -> None:
        for prompt, row in zip(prompts, rows, strict=True):
            seen = model_rows[prompt]
            sha = row_sha(row)
            if sha not in seen and len(seen) < 3:
                seen[sha] = row.clone()

    timeline = DeviceTimeline(engine) if str(args.device).startswith("cuda") else None
    timed = FakeEngine(timeline or engine, on_rows=keep_rows if args.keep_model_rows else None)

    def model_seconds() -> list[float]:
        # A pipelined batch's model time starts when the one before it finished, not when it was launched.
        spans, previous_end = [], 0.0
        done = sorted((r for r in timed.records if r.finished_at is not None), key=lambda r: r.finished_at or 0.0)
        for record in done:
            assert record.finished_at is not None
            spans.append(record.finished_at - max(record.launched_at, previous_end))
            previous_end = record.finished_at
        return spans

    server = ServerThread(settings, lambda _s: timed).start()
    # The same model call alone (no serving running), through the same wrapper, for comparison.
    alone = []
    for _ in range(3):
        timed.reset_counts()
        timed.encode(pool[:16])
        (record,) = timed.records
        assert record.finished_at is not None
        alone.append(record.finished_at - record.launched_at)
    # Device ms per prompt alone at the batch sizes served batches come in (for the starved-batch ratio).
    alone_device: dict[int, float] = {}
    if timeline is not None:
        for size in (8, 16, 32):
            timeline.reset()
            for _ in range(2):
                timed.encode(pool[:size])
            device_ms = timeline.report({})["device_ms_per_prompt"]
            alone_device[size] = device_ms
    pool_file = Path(tempfile.mkdtemp()) / "pool.json"
    pool_file.write_text(json.dumps(pool))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    results: dict[str, Any] = {}
    hashes_all: dict[int, set[str]] = defaultdict(set)
    try:
        for clients, seconds in patterns:
            timed.reset_counts()
            if timeline is not None:
                timeline.reset()
            # The server's access log records (one per request, with its stage times) while the load runs.
            with AccessLogStages() as stages:
                start_at = time.time() + args.client_startup_s
                stop_at = start_at + seconds
                procs = []
                for first in range(0, clients, per_proc):
                    n = min(per_proc, clients - first)
                    cmd = [sys.executable, "-m", "bench._load_clients", "--target", server.target,
                           "--threads", str(n), "--prompts", str(pool_file), "--start-at", str(start_at),
                           "--stop-at", str(stop_at), "--first-thread", str(first)]  # fmt: skip
                    procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, cwd=REPO_ROOT))
                records, errors = [], 0
                while time.time() < start_at:
                    time.sleep(0.01)
                t0, cpu0, sys0 = time.time(), process_cpu_s(), system_cpu_jiffies()
                # The machine's and this (the model) process's CPU over the load, read when the load stops.
                at_stop: dict[str, Any] = {}

                def read_at_stop(into: dict[str, Any] = at_stop) -> None:
                    into.update(system=system_cpu_jiffies(), model=process_cpu_s(), t=time.time())

                reader = threading.Timer(max(0.0, stop_at - time.time()), read_at_stop)
                reader.start()
                client_cpu_s = 0.0
                ready_late_s = 0.0  # a client whose warm-up ended after the load began started late
                for p in procs:
                    data = json.loads(p.communicate(timeout=seconds + args.client_startup_s + 300)[0])
                    records += data["records"]
                    errors += data["error_count"]
                    client_cpu_s += data.get("cpu_s", 0.0)
                    if data.get("last_ready_at") is not None:
                        ready_late_s = max(ready_late_s, data["last_ready_at"] - start_at)
                    if data["errors"]:
                        log("client errors", data["errors"][:3])
                cpu_used = process_cpu_s() - cpu0
                reader.join()
            load_s = max(1e-9, at_stop["t"] - t0)
            ticks = max(1, at_stop["system"][1] - sys0[1])
            cpu_fields = {
                # Cores in use on average during the load: the whole machine, the model process (the server in
                # this process, front-ends excluded), and the load clients' processes (all their threads).
                "machine_busy_cores": round((at_stop["system"][0] - sys0[0]) / ticks * (os.cpu_count() or 1), 2),
                "machine_cores": os.cpu_count(),
                "model_process_cores": round((at_stop["model"] - cpu0) / load_s, 2),
                "client_processes_cores": round(client_cpu_s / load_s, 2),
                "client_processes": len(procs),
                "clients_ready_late_s": round(ready_late_s, 2),
            }
            # Steady state: requests that started after the first second and ended before stop_at.
            lo = start_at + min(2.0, seconds / 4)
            window = [r for r in records if r[0] >= lo and r[1] <= stop_at]
            span = stop_at - lo
            lat = sorted(r[1] - r[0] for r in window)
            per_prompt: dict[int, set[str]] = defaultdict(set)
            for r in records:
                per_prompt[r[2]].add(r[3])
                hashes_all[r[2]].add(r[3])
            spans = model_seconds()
            # Time a client spent between the end of one of its requests and the start of its next (a closed
            # loop's "think time": all of it is client-side work), and the device's idle gaps between batches.
            by_thread: dict[int, list[tuple[float, float]]] = defaultdict(list)
            for r in records:
                by_thread[r[5]].append((r[0], r[1]))
            gaps = [b[0] - a[1] for runs in by_thread.values() for a, b in itertools.pairwise(sorted(runs))]
            done_batches = sorted(
                (r for r in timed.records if r.finished_at is not None), key=lambda r: r.finished_at or 0.0
            )
            idle = [
                max(0.0, later.launched_at - earlier.finished_at)  # type: ignore[operator]
                for earlier, later in itertools.pairwise(done_batches)
            ]
            served_prompts = sum(len(r.prompts) for r in timed.records if r.finished_at is not None)
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
                "latency_p99_s": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
                "model_batch_sizes": dict(sorted(timed.batch_sizes.items())),
                "prompts_with_more_than_one_hash": sum(len(h) > 1 for h in per_prompt.values()),
                "distinct_prompts": len(per_prompt),
                "batching_mode_in_header": sorted({r[4] for r in records}),
                # Served model calls: ms per prompt inside the batch (compare with the engine rows).
                "model_ms_per_prompt_served": round(1000 * sum(spans) / max(1, served_prompts), 2),
                "model_busy_fraction": round(sum(spans) / seconds, 3),
                # Host time in the engine's launch: the forward's kernel launches (since issue 15 the prompts are
                # tokenized before, on the batcher's tokenizer thread; earlier runs counted tokenizing here too).
                "launch_ms_per_batch": round(1000 * statistics.mean(r.launch_seconds for r in timed.records), 1)
                if timed.records
                else None,
                "client_gap_ms_median": round(1000 * statistics.median(gaps), 1) if gaps else None,
                # A batch launched after the one before it finished: the device waited that long for work.
                "device_idle_ms_between_batches_median": round(1000 * statistics.median(idle), 1) if idle else None,
                "batches_launched_after_the_previous_finished": sum(g > 0 for g in idle),
                **cpu_fields,
                **stages.medians(),
                **(timeline.report(alone_device) if timeline is not None else {}),
            }
            if args.keep_model_rows:
                row["model_rows"] = model_row_report(model_rows, per_prompt, pool)
                model_rows.clear()
            results[f"{clients}_clients"] = row  # the last run of this client count
            results.setdefault("runs", []).append(row)
            log(key, row)
    finally:
        server.stop()
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
    results["device_ms_per_prompt_alone"] = alone_device
    results["threads_per_process"] = per_proc
    results["pipeline_depth"] = pipeline_depth
    results["max_batch_prompts"] = max_batch or args.max_batch
    results["cuda_graph_sizes"] = list(getattr(engine, "cuda_graph_sizes", ()))
    results["frontends"] = frontends
    results["launch_lead_ms"] = args.launch_lead_ms
    results["balance_batches"] = args.balance_batches
    results["by_clients"] = medians_by_clients(results["runs"])
    report[key] = results


def medians_by_clients(runs: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Median and range over the runs of each client count (never the best run)."""

    def spread(values: list[float]) -> dict[str, float | int]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}

    out: dict[int, dict[str, Any]] = {}
    for clients in sorted({r["clients"] for r in runs}):
        same = [r for r in runs if r["clients"] == clients]
        out[clients] = {"prompts_per_s": spread([r["prompts_per_s"] for r in same])}
        out[clients]["completions_per_s"] = spread([r["completions_per_s"] for r in same])
        for key in ("latency_median_s", "latency_p99_s"):
            values = [r[key] for r in same if r[key] is not None]
            if values:
                out[clients][key] = spread(values)
        out[clients]["errors"] = sum(r["errors"] for r in same)
    return out


def frontends_ab(report: Report, engine: Any, pool: list[str], args: argparse.Namespace, key: str) -> None:
    """Issue 15: the engine alone at --max-batch (median of --reps) against the server with each
    --frontends-list value (0: today's single process), every --client-counts run --served-runs times;
    medians and ranges in `by_clients`, every response's sha256 checked against the engine's."""
    # The engine at half the batch too: a closed loop of N clients with two batches in flight runs batches of
    # about N / 2, whose rate is the served path's ceiling.
    batches = sorted({max(1, args.max_batch // 2), args.max_batch})
    bench_engine(report, engine, pool, argparse.Namespace(**{**vars(args), "batches": batches}), key)
    for spec in args.frontends_list:
        # "4" (every --client-counts), "0:32" (only these counts), "2:32:no-balance" / "2:32:balance" (this
        # row with --balance-batches off / on whatever the flag says, for an A/B on one engine in one run).
        parts = spec.split(":")
        n = int(parts[0])
        counts = parts[1] if len(parts) > 1 else ""
        client_counts = [int(c) for c in counts.split(",")] if counts else args.client_counts
        row_args = args
        if len(parts) > 2:
            if parts[2] not in ("balance", "no-balance"):
                raise SystemExit(f"--frontends-list {spec!r}: the third part is balance or no-balance")
            row_args = argparse.Namespace(**{**vars(args), "balance_batches": parts[2] == "balance"})
        row_key = f"{key}_served_frontends{n}" + ("" if row_args.balance_batches else "_no_balance")
        patterns = [(c, args.served_seconds) for c in client_counts for _ in range(args.served_runs)]
        serve(report, engine, pool, row_args, row_key, patterns, frontends=n)
        engine_rate = next(r["prompts_per_s"] for r in report[key] if r["batch"] == args.max_batch)
        for clients, row in report[row_key]["by_clients"].items():
            row["vs_engine"] = round(row["prompts_per_s"]["median"] / engine_rate, 3)
            row["completions_vs_engine"] = round(row["completions_per_s"]["median"] / engine_rate, 3)
            log(key, f"frontends={n}", f"balance={row_args.balance_batches}", f"{clients} clients", row)


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


def pipeline_ab(report: Report, full: Any, tok: Any, pool: list[str], args: argparse.Namespace) -> None:
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
        bench_engine(report, engine, pool, args, f"engine_compiled_{precision}")
        if args.slot_sweep:
            slot_invariance(report, engine, pool, f"slot_invariance_compiled_eager_{precision}")
        warmed: set[str] = set()
        for _, path, depth, max_batch, clients, tpp in (s for s in specs if s[0] == precision):
            if path == "graphs" and not engine.cuda_graph_sizes:
                t0 = time.time()
                sizes = engine.capture_cuda_graphs(graph_batch_sizes(32, engine.min_batch))
                report[f"graphs_capture_s_{precision}"] = {"seconds": round(time.time() - t0, 1), "sizes": sizes}
                bench_engine(report, engine, pool, args, f"engine_compiled_graphs_{precision}")
                graph_invariance(report, engine, pool, f"graph_buckets_invariance_{precision}")
                if args.slot_sweep:
                    slot_invariance(report, engine, pool, f"slot_invariance_compiled_graphs_{precision}")
            if path == "eager":
                engine.release_cuda_graphs()
            load = [(int(clients), args.served_seconds)]
            if path not in warmed:
                load.insert(0, (int(clients), 4.0))
                warmed.add(path)
            key = f"served_{precision}_compiled_{path}_depth{depth}_mb{max_batch}_{clients}clients_{tpp}tpp"
            serve(report, engine, pool, args, key, load, 0.001, pipeline_depth=int(depth), max_batch=int(max_batch),
                  threads_per_process=int(tpp))  # fmt: skip
        engine.uncompile()  # bf16 layers are shared with `full`: they get their eager forward back
        del engine
        gc.collect()
        torch.cuda.empty_cache()


def slot_invariance(
    report: Report, engine: Any, pool: list[str], key: str, sizes: tuple[int, ...] = (2, 4, 8, 16, 24, 32)
) -> None:
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
    report[key] = {"slots_differing_from_alone": differ, "cases": sum(sizes),
                   "identical_cases": sum(sizes) - sum(len(v) for v in differ.values())}  # fmt: skip
    log(key, report[key])


def graph_invariance(report: Report, engine: Any, pool: list[str], key: str) -> None:
    """A probe prompt alone (bucket 2) and inside a full batch of every captured size: same bytes?"""
    probe = pool[0]
    alone = row_sha(engine.encode([probe])[0])
    report[key] = {
        str(size): row_sha(engine.encode([probe, *pool[1:size]])[0]) == alone for size in engine.cuda_graph_sizes
    }
    log(key, report[key])


def ceiling(report: Report, pool: list[str], args: argparse.Namespace) -> None:
    """The serving path alone: a fake engine that answers at once with rows of the real width."""
    from flux2_encoder_server.testing import FakeEngine

    with report.section("ceiling"):
        null = FakeEngine(width=embedding_width(args))
        one = [(args.clients, args.served_seconds)]
        serve(report, null, pool, args, "served_null_engine_switch1ms", one, switch_interval_s=0.001)
        serve(report, null, pool, args, "served_null_engine_switch1ms_2threads_per_process", one, 0.001,
              threads_per_process=2)  # fmt: skip


def bench_tiers(
    report: Report, full: Any, tok: Any, pool: list[str], args: argparse.Namespace, bf16_engine: Any
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
                for i, layer in enumerate(("9", "18", "27") if is_klein(args) else ("10", "20", "30"))
            }
            embeds_for_dit[precision] = got[:1].clone()
            rows[precision] = row
            log("tier", precision, row)
        finally:
            if engine is not bf16_engine:
                del engine
    report["tiers"] = rows
    return embeds_for_dit


def dit_fidelity(report: Report, embeds: dict[str, torch.Tensor], args: argparse.Namespace) -> None:
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
    report["dit_one_step"] = rows
    log("dit", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy shapes, for checking the script on a CPU")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--encoder",
        choices=ENCODERS,
        default="mistral-small-3.1",
        help="the text encoder at its real shape: FLUX.2-dev's Mistral, or FLUX.2 [klein] 4B's / 9B's Qwen3",
    )
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
    parser.add_argument("--launch-lead-ms", type=float, default=50.0, help="the server's --launch-lead-ms (0: off)")
    parser.add_argument(
        "--balance-batches",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the server's --balance-batches (on by default, as the server's; --no-balance-batches: off)",
    )
    parser.add_argument("--tiers", nargs="+", default=["bf16", "fp8", "int8", "nf4"])
    parser.add_argument("--tier-batch", type=int, default=16)
    parser.add_argument("--serve-compiled", action="store_true", help="serve the torch.compile'd engine")
    parser.add_argument("--keep-model-rows", action="store_true", help="served rows: keep and compare model outputs")
    parser.add_argument("--slot-sweep", action="store_true", help="pipeline section: probe at every slot")
    parser.add_argument(
        "--pipeline-rows",
        nargs="+",
        default=["bf16/eager/1/32/32/8", "bf16/eager/2/16/32/8", "bf16/graphs/2/16/32/8", "fp8/graphs/2/16/32/8"],
        help="served rows of the pipeline section: PRECISION/PATH/DEPTH/MAXBATCH/CLIENTS/TPP",
    )
    parser.add_argument("--threads-per-process", type=int, default=8, help="client threads per load process")
    parser.add_argument(
        "--frontends-list",
        nargs="+",
        default=["0", "4"],
        help="frontends section: --frontends values, each N or N:CLIENTS,CLIENTS (then only those client counts),"
        " optionally N:CLIENTS:no-balance or N:CLIENTS:balance (that row's --balance-batches)",
    )
    parser.add_argument("--client-counts", type=int, nargs="+", default=[1, 8, 32, 64], help="frontends section")
    parser.add_argument("--served-runs", type=int, default=3, help="frontends section: runs per client count")
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp8"], help="frontends section")
    parser.add_argument(
        "--model-threads", type=int, default=None, help="torch.set_num_threads in this (the model) process"
    )
    args = parser.parse_args()
    if args.model_threads:
        torch.set_num_threads(args.model_threads)
    report = Report(Path(args.out), "encoder_throughput")
    sections = set(args.sections.split(","))

    from flux2_client.tiny import build_tiny_tokenizer
    from flux2_client.tiny_klein import build_tiny_qwen3_tokenizer
    from flux2_encoder_server import EncoderEngine
    from flux2_encoder_server.precision import module_bytes

    env = {"torch": torch.__version__, "argv": sys.argv, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}  # fmt: skip
    if args.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    import diffusers
    import transformers

    env["transformers"] = transformers.__version__
    env["diffusers"] = diffusers.__version__
    report["env"] = env
    log(env)

    env["encoder"] = args.encoder
    pool = prompts(64)
    if is_klein(args):
        # A byte-level tokenizer with Qwen3's special tokens and chat template; every prompt is padded to 512
        # tokens, so the work per prompt is the real one whatever the vocabulary.
        tok = build_tiny_qwen3_tokenizer()
        chats = [[{"role": "user", "content": p}] for p in pool]
        template = {"tokenize": False, "add_generation_prompt": True, "enable_thinking": False}
        texts = [tok.apply_chat_template(c, **template) for c in chats]
        lengths = [len(tok(text, truncation=True, max_length=512)["input_ids"]) for text in texts]
        if "dit" in sections:
            log("the dit section measures FLUX.2-dev's DiT: skipped for", args.encoder)
            sections.discard("dit")
    else:
        tok = build_tiny_tokenizer()
        lengths = [int(m.sum()) for m in tok.apply_chat_template(
            [[{"role": "system", "content": [{"type": "text", "text": "x" * 170}]},
              {"role": "user", "content": [{"type": "text", "text": p}]}] for p in pool],
            tokenize=True, return_dict=True, return_tensors="pt", padding="max_length", truncation=True,
            max_length=512)["attention_mask"]]  # fmt: skip
    report["prompt_tokens"] = {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)}

    if sections == {"ceiling"}:
        ceiling(report, pool, args)
        print_tables(report)
        return

    t0 = time.time()
    full = (
        build_qwen3_encoder(args.encoder, args.tiny, args.device)
        if is_klein(args)
        else build_encoder(args.tiny, args.device)
    )
    sync(args.device)
    report["model"] = {
        "build_s": round(time.time() - t0, 1),
        "full_model_gib": module_bytes(full) / GIB,
        "attn_implementation": getattr(getattr(full.config, "text_config", full.config), "_attn_implementation", None),
    }
    log("model", report["model"])
    report.save()

    diffusers_single: dict[int, torch.Tensor] = {}
    diffusers_batch: torch.Tensor | None = None
    if "reference" in sections:
        with report.section("reference"):
            diffusers_single, diffusers_batch = bench_reference(report, full, tok, pool, args)

    repro = EncoderEngine.from_model(full, tok, batching_mode="reproducible")
    dynamic = EncoderEngine.from_model(full, tok, batching_mode="dynamic")
    report["model"]["engine_weights_gib"] = module_bytes(repro.decoder) / GIB
    if "engine" in sections:
        with report.section("engine"):
            bench_engine(report, dynamic, pool, args, "engine_eager_dynamic")
            bench_engine(report, repro, pool, args, "engine_eager_reproducible")
            if diffusers_batch is not None:
                engines = {"eager_dynamic": dynamic, "eager_reproducible": repro}
                engine_vs_diffusers(report, engines, pool, diffusers_batch)
                diffusers_batch = None
    if "invariance" in sections and diffusers_single:
        with report.section("invariance"):
            invariance(report, dynamic, pool, diffusers_single, "invariance_eager_dynamic")
            invariance(report, repro, pool, diffusers_single, "invariance_eager_reproducible")
    if "served" in sections and not args.serve_compiled:
        with report.section("served"):
            patterns = [(args.clients, args.served_seconds), (1, 4.0), (5, 4.0)]
            serve(report, repro, pool, args, "served_eager_reproducible", patterns)
            serve(report, dynamic, pool, args, "served_eager_dynamic", [(args.clients, 8.0), (1, 4.0)])
    if "frontends" in sections:
        with report.section("frontends"):
            for precision in args.precisions:
                engine = repro
                if precision != "bf16" or args.serve_compiled:
                    engine = EncoderEngine.from_model(
                        full, tok, precision=precision, compile=args.serve_compiled, batching_mode="reproducible"
                    )
                    # Compiled: every batch size the server may run, compiled before anything is timed.
                    for size in range(1, args.max_batch + 1) if args.serve_compiled else (2,):
                        engine.encode(pool[:size])
                frontends_ab(report, engine, pool, args, f"frontends_{precision}")
                if engine is not repro:
                    with contextlib.suppress(AttributeError):
                        engine.uncompile()  # the shared bf16 layers get their eager forward back
                    del engine
    embeds_for_dit: dict[str, torch.Tensor] = {}
    if "tiers" in sections:
        with report.section("tiers"):
            embeds_for_dit = bench_tiers(report, full, tok, pool, args, repro)
    if "compile" in sections:
        with report.section("compile"):
            eager_embeds = repro.encode(pool[:8])  # before compiling: the layers are shared
            t0 = time.time()
            compiled = EncoderEngine.from_model(full, tok, batching_mode="reproducible", compile=True)
            compiled.encode(pool[:2])
            sync(args.device)
            report["compile_first_call_s"] = round(time.time() - t0, 1)
            log("compiled first call", report["compile_first_call_s"])
            bench_engine(report, compiled, pool, args, "engine_compiled_reproducible")
            if diffusers_single:
                invariance(report, compiled, pool, diffusers_single, "invariance_compiled_reproducible")
            embeds_for_dit["bf16_compiled"] = compiled.encode(pool[:8])[:1].clone()
            report["compiled_vs_eager"] = compare(compiled.encode(pool[:8]), eager_embeds)
            if "served" in sections and args.serve_compiled:
                one = [(args.clients, args.served_seconds)]
                serve(report, compiled, pool, args, "served_compiled_reproducible", [*one, (1, 4.0)])
                serve(report, compiled, pool, args, "served_compiled_switch1ms", one, switch_interval_s=0.001)
                serve(report, compiled, pool, args, "served_compiled_switch1ms_chunk3MiB", one, 0.001, 3 << 20)
    if "pipeline" in sections:
        with report.section("pipeline"):
            pipeline_ab(report, full, tok, pool, args)
    if "fp8" in sections:
        with report.section("fp8"):
            with contextlib.suppress(NameError):
                compiled.uncompile()  # the shared bf16 layers get their eager forward back
            fp8 = EncoderEngine.from_model(full, tok, precision="fp8", compile=True)
            fp8.encode(pool[:2])
            bench_engine(report, fp8, pool, args, "engine_compiled_fp8_reproducible")
            if "served" in sections:
                one = [(args.clients, args.served_seconds)]
                serve(report, fp8, pool, args, "served_compiled_fp8_switch1ms", one, 0.001)
            del fp8
    if "ceiling" in sections:  # after the model rows, which matter more if the call runs out of time
        ceiling(report, pool, args)
    if diffusers_single and embeds_for_dit:
        embeds_for_dit["diffusers_single_B1"] = diffusers_single[args.probes[0]]
    if "dit" in sections and embeds_for_dit:
        with report.section("dit"):
            # Free the encoder first: the DiT needs the room.
            del repro, dynamic, full
            with contextlib.suppress(NameError):
                del compiled
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            dit_fidelity(report, embeds_for_dit, args)
    report.save()
    print_tables(report)


def print_tables(r: Report) -> None:
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
