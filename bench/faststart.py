"""Time to SERVING and bytes read for the FLUX.2-dev text encoder at its real size, before and after the
pruned weights loader (encoder_server/flux2_encoder_server/weights.py).

write     random bf16 weights for Mistral3ForConditionalGeneration at Mistral Small 3.1 24B's shapes
          (bench/_models.py encoder_config: 40 layers, hidden 5120, vision tower, output head) written from
          the GPU in the hub repo's layout: ~5 GB safetensors shards in parameter order,
          model.safetensors.index.json (weight_map), config.json, and a tokenizer. Written once to a disk
          folder (`--dir`; reused when complete) and read by every variant.
variants  loader "transformers" (before: transformers' from_pretrained of the whole encoder, then pruned;
          nf4 loads bf16 on the host first) and "pruned" (after), in bf16 and nf4. Before each one the
          shards are evicted from the page cache (fsync + posix_fadvise DONTNEED), so every load reads
          from the disk (disk_read_gb shows it did). Time to SERVING = EncoderEngine.from_pretrained + one
          warm-up encode, what the server does before health turns SERVING (process start and imports are
          the same for both).
measured  seconds (load, warm-up), bytes read from the disk (/proc/self/io read_bytes) and by the loader
          (tensor bytes), bytes a hub download would fetch (before: every shard the index lists, as
          transformers resolves it; after: the shards holding read tensors), peak host memory (VmHWM, and
          sampled anonymous / file-backed RSS), peak GPU memory; and whether before and after give the
          same bytes for two prompts.

  python -m bench.faststart [--dir /var/tmp/flux2-faststart] [--variants transformers:bf16 pruned:nf4 ...]

The JSON goes to $FLUX2_BENCH_OUT (a file, or faststart.json in it when it is a folder) or stdout; progress
to stderr. Needs ~49 GB of free disk for the checkpoint, ~40 GB of host RAM for the "before" nf4 load and
bitsandbytes for nf4 (variants whose tier cannot load are reported with the error).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from bench._models import encoder_config, prompts

DEFAULT_VARIANTS = ("transformers:bf16", "pruned:bf16", "transformers:nf4", "pruned:nf4")
SHARD_BYTES = 5_000_000_000  # transformers' default max_shard_size, as the hub repo's ~10 shards show


def log(message: str) -> None:
    print(f"[faststart {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_checkpoint(root: Path, tiny: bool, device: str) -> dict[str, Any]:
    """The random checkpoint under `root` (text_encoder/, tokenizer/), written unless already complete."""
    from flux2_client.tiny import build_tiny_tokenizer, tiny_text_encoder_config, write_random_checkpoint
    from transformers import Mistral3ForConditionalGeneration

    done = root / "complete.json"
    if done.exists():
        log(f"reusing the checkpoint in {root}")
        return dict(json.loads(done.read_text()), reused=True)
    started = time.monotonic()
    folder = root / "text_encoder"
    config, shard_bytes = (tiny_text_encoder_config(), 400_000) if tiny else (encoder_config(), SHARD_BYTES)
    # The real checkpoint stores its own output head (48 GB in all); a tied one would not be written.
    config.tie_word_embeddings = False
    weight_map = write_random_checkpoint(
        Mistral3ForConditionalGeneration, config, folder, max_shard_bytes=shard_bytes, device=device
    )
    build_tiny_tokenizer().save_pretrained(root / "tokenizer")  # token ids < 1256: any vocabulary takes them
    files = sorted(set(weight_map.values()))
    for name in files:
        with open(folder / name, "rb+") as fh:
            os.fsync(fh.fileno())
    nbytes = sum((folder / name).stat().st_size for name in files)
    info = {
        "seconds": round(time.monotonic() - started, 1),
        "files": len(files),
        "bytes": nbytes,
        "tensors": len(weight_map),
        "key_layout": next(k for k in weight_map if k.endswith("embed_tokens.weight")),
    }
    done.write_text(json.dumps(info))
    log(f"wrote {nbytes / 1e9:.1f} GB in {len(files)} shards in {info['seconds']} s")
    return dict(info, reused=False)


def shard_files(root: Path) -> list[Path]:
    index = json.loads((root / "text_encoder" / "model.safetensors.index.json").read_text())
    return [root / "text_encoder" / name for name in sorted(set(index["weight_map"].values()))]


def evict_from_page_cache(files: list[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def proc_io_read_bytes() -> int | None:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class HostMemory:
    """Peak RSS (VmHWM after a reset) and sampled peaks of anonymous and file-backed RSS."""

    def __enter__(self) -> HostMemory:
        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.resettable = True
        except OSError:
            self.resettable = False
        self.start = {f: status_bytes(f) for f in ("VmRSS", "RssAnon", "RssFile")}
        self.peak = dict(self.start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            for field in self.peak:
                self.peak[field] = max(self.peak[field], status_bytes(field))

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.hwm = status_bytes("VmHWM") if self.resettable else None

    def result(self) -> dict[str, Any]:
        gb = 1e9
        return {
            "peak_rss_gb": round((self.hwm - self.start["VmRSS"]) / gb, 2) if self.hwm else None,
            "sampled_peak_anon_gb": round((self.peak["RssAnon"] - self.start["RssAnon"]) / gb, 2),
            "sampled_peak_file_gb": round((self.peak["RssFile"] - self.start["RssFile"]) / gb, 2),
        }


def run_variant(root: Path, loader: str, precision: str, texts: list[str], device: str) -> tuple[dict[str, Any], Any]:
    from flux2_encoder_server import EncoderEngine

    files = shard_files(root)
    evict_from_page_cache(files)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    read_before = proc_io_read_bytes()
    with HostMemory() as memory:
        started = time.monotonic()
        engine = EncoderEngine.from_pretrained(str(root), device=device, precision=precision, loader=loader)
        loaded = time.monotonic()
        engine.encode(["warm-up"])  # waits for the device
        serving = time.monotonic()
    read_after = proc_io_read_bytes()
    disk_read = None if read_before is None or read_after is None else read_after - read_before
    report = engine.load_report
    every_shard = sum(p.stat().st_size for p in files)
    if loader == "pruned" and report is not None:
        would_download = sum((root / "text_encoder" / name).stat().st_size for name in report.files)
    else:
        would_download = every_shard  # transformers resolves (downloads) every shard the index lists
    row = {
        "variant": f"{loader}:{precision}",
        "time_to_serving_s": round(serving - started, 2),
        "load_s": round(loaded - started, 2),
        "warmup_s": round(serving - loaded, 2),
        "weights_s": round(report.seconds, 2) if report else None,
        "disk_read_gb": None if disk_read is None else round(disk_read / 1e9, 3),
        "loader_read_gb": round(report.bytes_read / 1e9, 3) if report and report.bytes_read else None,
        "hub_download_gb": round(would_download / 1e9, 3),
        "shards_read": len(report.files) if report and report.files else len(files),
        "shards_total": len(files),
        "gpu_peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None,
        "gpu_after_gb": round(torch.cuda.memory_allocated() / 1e9, 2) if cuda else None,
        **memory.result(),
    }
    embeds = engine.encode(texts)
    log(json.dumps(row))
    del engine
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row, embeds


def filesystem_of(path: Path) -> str | None:
    best, kind = "", None
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and str(path.resolve()).startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], f"{parts[2]} on {parts[1]} ({parts[0]})"
    except OSError:
        pass
    return kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/flux2-faststart"), help="checkpoint folder (disk)")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), help="loader:precision ...")
    parser.add_argument("--tiny", action="store_true", help="the tiny encoder (a smoke test of this script)")
    args = parser.parse_args()
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        sys.exit("faststart: the real-size run needs a CUDA GPU (--tiny runs on the CPU)")
    args.dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "machine": {
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cpus": os.cpu_count(),
            "checkpoint_filesystem": filesystem_of(args.dir),
        },
        "checkpoint": write_checkpoint(args.dir, args.tiny, device),
        "variants": [],
        "identical": {},
    }
    texts = prompts(2, seed=1)
    outputs: dict[str, Any] = {}
    target = os.environ.get("FLUX2_BENCH_OUT")
    out_path = None
    if target:
        out_path = Path(target) / "faststart.json" if Path(target).is_dir() else Path(target)
    for variant in args.variants:
        loader, precision = variant.split(":")
        log(f"{variant} ...")
        try:
            row, embeds = run_variant(args.dir, loader, precision, texts, device)
        except Exception as exc:  # a tier that cannot load here (e.g. no bitsandbytes): say so, go on
            log(f"{variant} failed: {exc!r}")
            results["variants"].append({"variant": variant, "error": repr(exc)[:500]})
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        results["variants"].append(row)
        outputs.setdefault(precision, {})[loader] = embeds
        if out_path is not None:  # after every variant: a run cut short still leaves what it measured
            out_path.write_text(json.dumps(results, indent=1))
    for precision, by_loader in outputs.items():
        if len(by_loader) == 2:
            a, b = by_loader.values()
            results["identical"][precision] = bool(torch.equal(a, b))
    text = json.dumps(results, indent=1)
    if out_path is not None:
        out_path.write_text(text)
        log(f"wrote {out_path}")
    else:
        print(text)


if __name__ == "__main__":
    main()
