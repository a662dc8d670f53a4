"""Host RAM while the block streamer lays out an NF4 DiT: the streamed load against the old copy (issue 11).

Runs on a CPU (a mid-size DiT by default) or a GPU (`--config dev`: FLUX.2-dev's shapes). Each row is a
fresh process that loads the DiT, plans it under a budget that keeps some units resident and streams the
others, and lays it out with `apply_block_streaming` in one load mode:

- `stream`: each source tensor let go as soon as it is copied (the default since issue 11),
- `copy`: every source kept until the layout is done (the behaviour before).

The DiT comes either from a pre-quantized checkpoint (`checkpoint`, the CLI's path: memory-mapped
safetensors through `load_nf4_transformer`; written once into `--dir`) or from the seeded build in
anonymous host memory (`build`). Reported: peak RSS over the load (from before the checkpoint is opened,
or from after the build), RSS after, split into anonymous and file-backed pages, against the DiT's bytes.

    python -m bench.host_ram                         # CPU, mid-size DiT (~340 MiB NF4)
    python -m bench.host_ram --config dev --device cuda --dir /tmp/nf4-dit
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .lowvram import REPO_ROOT, HostPeak, _host

MiB = 1 << 20
CONFIGS: dict[str, dict[str, Any]] = {
    # 2048 wide, 2 double + 6 single blocks: big enough that allocator noise is small, quick on a CPU.
    "mid": {
        "num_attention_heads": 16,
        "attention_head_dim": 128,
        "num_layers": 2,
        "num_single_layers": 6,
        "joint_attention_dim": 2048,
    },
    "dev": {},  # diffusers' defaults are FLUX.2-dev's shapes
}


def worker(source: str, load_mode: str, config: str, device: str, folder: Path) -> dict[str, Any]:
    import torch
    from flux2_client._quantization import load_nf4_transformer
    from flux2_client.offload import apply_block_streaming, spec_from_module
    from flux2_client.planner import Budget, Workload, _group_units, activation_bytes, plan_memory, vae_decode_bytes

    from ._models import build_nf4_dit

    result: dict[str, Any] = {"source": source, "load_mode": load_mode, "config": config, "device": device}
    if source == "build":
        model = build_nf4_dit(torch.device(device), config=CONFIGS[config])
        result["start"] = _host()
        peak = HostPeak()
    else:
        result["start"] = _host()
        peak = HostPeak()
        model = load_nf4_transformer(str(folder), device="cpu")
    spec = spec_from_module(model)
    # A budget that keeps about a third of the units resident and streams the rest through two slots.
    workload = Workload(256, 256)
    work = max(activation_bytes(spec, workload), vae_decode_bytes(spec, workload, tiled=False))
    block = max(n for _, n in _group_units(spec, "block"))
    overhead = 1 << 30 if device != "cpu" else 0
    vram = int((spec.other_bytes + work + 2 * block + spec.block_bytes / 3) / 0.94) + overhead
    plan = plan_memory(spec, workload, Budget(vram=vram, device_type=torch.device(device).type))
    t0 = time.perf_counter()
    apply_block_streaming(model, plan, device, load_mode=load_mode)
    result["layout_s"] = time.perf_counter() - t0
    result["peak"] = peak.stop()
    result["peak_exact"] = peak.exact
    result["after"] = _host()
    result.update(
        dit_bytes=spec.loaded_bytes,
        pinned=plan.host_pinned_bytes,
        slots=plan.num_slots * plan.slot_bytes,
        resident_units=sum(u.resident for u in plan.units),
        units=len(plan.units),
        plan_host_load_peak=plan.host_load_peak_bytes,
    )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="mid")
    parser.add_argument("--device", default="cpu", help="where the resident units and slots go (cpu or cuda)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/flux2-host-ram-dit"), help="checkpoint folder")
    parser.add_argument("--rows", default="checkpoint:copy,checkpoint:stream,build:copy,build:stream")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        res = worker(args.worker[0], args.worker[1], args.config, args.device, args.dir)
        print("RESULT " + json.dumps(res), flush=True)
        return
    if "checkpoint" in args.rows and not (args.dir / "transformer" / "config.json").is_file():
        code = (
            "import torch; from bench._models import build_nf4_dit, save_nf4_dit; from bench.host_ram import CONFIGS; "
            f"save_nf4_dit(build_nf4_dit(torch.device({args.device!r}), config=CONFIGS[{args.config!r}]), "
            f"{str(args.dir)!r})"
        )
        subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=900)
    results = []
    print(
        "| DiT from | load mode | DiT MiB | pinned MiB | peak RSS above start MiB | after: anon / file MiB | layout s |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in args.rows.split(","):
        source, load_mode = row.split(":")
        cmd = [sys.executable, "-m", "bench.host_ram", "--config", args.config, "--device", args.device]
        cmd += ["--dir", str(args.dir), "--worker", source, load_mode]
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if not lines:
            print(f"| {source} | {load_mode} | failed: {proc.stderr[-300:]!r} | | | | |")
            continue
        r = json.loads(lines[-1][7:])
        results.append(r)
        start, after = r["start"], r["after"]
        print(
            f"| {source} | {load_mode} | {r['dit_bytes'] / MiB:.0f} | {r['pinned'] / MiB:.0f} | "
            f"{(r['peak'] - start['VmRSS']) / MiB:.0f} | {(after['RssAnon'] - start['RssAnon']) / MiB:.0f} / "
            f"{(after['RssFile'] - start['RssFile']) / MiB:.0f} | {r['layout_s']:.2f} |",
            flush=True,
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
