"""Bulk caption encoding into safetensors shards, and the loader that feeds them to a training loop.

    flux2-client encode captions.txt --server encoder:50051 --out embeds/
    flux2-client encode data.jsonl --field text --server https://encoder.example/predict --out embeds/
    flux2-client encode dreambooth_images/ --server encoder:50051 --out embeds/   # image + same-name .txt

An output folder holds

    shard-00000.safetensors   "prompt_embeds" (n, 512, D) bf16; metadata: the model digest and the
                              n captions (JSON), so every shard describes itself
    index.json                the model fingerprint, the shards, and caption -> [shard, row]

Shards are written to a temporary name and renamed, and the index is rewritten (same way) after each
shard, so an interrupted run leaves only complete shards. Running the same command again resumes: it
adopts every complete shard (also one written just before a crash, before the index caught up) and
encodes only the captions that are in none. Identical captions are encoded once. Ctrl-C stops sending,
waits for the requests in flight and saves them, so nothing already encoded is lost.

`EmbeddingShards(folder, expected_fingerprint=...)` memory-maps the shards and returns
`(prompt_embeds, text_ids)` for a batch of captions, reading only their rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .training import Encoder

INDEX_NAME = "index.json"
INDEX_FORMAT = "flux2-split/embedding-shards/v1"
TENSOR_KEY = "prompt_embeds"
META_FINGERPRINT = "flux2split.fingerprint"
META_CAPTIONS = "flux2split.captions"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_SHARD_RE = re.compile(r"^shard-(\d+)\.safetensors$")


class ShardFingerprintError(ValueError):
    """Shards made by another model than the one expected (or than the server now serves)."""


# -- reading captions ---------------------------------------------------------------------------------
def read_captions(path: str | Path, kind: str = "auto", field: str = "caption") -> list[str]:
    """Captions in input order (duplicates kept). `kind`: text (one caption per non-blank line), jsonl
    (the `field` of each JSON object per line), images (a folder of images with same-stem .txt files),
    or auto (a folder -> images, *.jsonl -> jsonl, anything else -> text)."""
    path = Path(path)
    if kind == "auto":
        kind = "images" if path.is_dir() else "jsonl" if path.suffix.lower() == ".jsonl" else "text"
    if kind == "text":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [line for line in lines if line.strip()]
    if kind == "jsonl":
        return list(_jsonl_captions(path, field))
    if kind == "images":
        return _sidecar_captions(path)
    raise ValueError(f"kind: expected auto, text, jsonl or images, got {kind!r}")


def _jsonl_captions(path: Path, field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc})") from None
            if not isinstance(record, dict) or field not in record:
                raise ValueError(f"{path}:{number}: no {field!r} field (choose it with --field)")
            if not isinstance(record[field], str):
                raise ValueError(f"{path}:{number}: {field!r} is {type(record[field]).__name__}, not a string")
            yield record[field]


def _sidecar_captions(folder: Path) -> list[str]:
    images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    missing = [p for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        raise ValueError(f"{folder}: {len(missing)} image(s) without a .txt caption, e.g. {missing[0].name}")
    return [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in images]


# -- the shard folder ---------------------------------------------------------------------------------
def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class _ShardFolder:
    """The writing side: the set of captions already saved, and atomic shard + index writes."""

    def __init__(self, folder: Path, fingerprint: dict[str, Any]):
        self.folder = folder
        self.fingerprint = fingerprint
        self.digest = str(fingerprint["digest"])
        self.shards: dict[str, int] = {}
        self.captions: dict[str, tuple[str, int]] = {}
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in folder.glob("*.tmp"):  # a write that was cut off
            leftover.unlink()
        index_path = folder / INDEX_NAME
        if index_path.exists():
            index = json.loads(index_path.read_text(encoding="utf-8"))
            theirs = index.get("fingerprint", {}).get("digest")
            if theirs != self.digest:
                raise ShardFingerprintError(
                    f"{folder} holds embeddings of model digest {str(theirs)[:16]}…; this server serves "
                    f"{fingerprint.get('weights_id')} (digest {self.digest[:16]}…): use another --out"
                )
            self.shards = dict(index["shards"])
            self.captions = {c: (s, r) for c, (s, r) in index["captions"].items()}
        self.next_number = 0
        adopted = False
        from safetensors import safe_open

        for path in sorted(folder.glob("shard-*.safetensors")):
            match = _SHARD_RE.match(path.name)
            if not match:
                continue
            self.next_number = max(self.next_number, int(match.group(1)) + 1)
            if path.name in self.shards:
                continue
            # Renamed into place, but the run stopped before the index was rewritten: adopt it.
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
            if meta.get(META_FINGERPRINT) != self.digest:
                raise ShardFingerprintError(f"{path} was made by model digest {meta.get(META_FINGERPRINT)}")
            shard_captions = json.loads(meta[META_CAPTIONS])
            self.shards[path.name] = len(shard_captions)
            for row, caption in enumerate(shard_captions):
                self.captions.setdefault(caption, (path.name, row))
            adopted = True
        if adopted or not index_path.exists():
            self._write_index()

    def write_shard(self, rows: list[tuple[str, torch.Tensor]]) -> str:
        import torch
        from safetensors.torch import save

        name = f"shard-{self.next_number:05d}.safetensors"
        self.next_number += 1
        captions = [caption for caption, _ in rows]
        tensor = torch.stack([row for _, row in rows]).contiguous()
        metadata = {META_FINGERPRINT: self.digest, META_CAPTIONS: json.dumps(captions, ensure_ascii=False)}
        _atomic_write(self.folder / name, save({TENSOR_KEY: tensor}, metadata=metadata))
        self.shards[name] = len(rows)
        for row, caption in enumerate(captions):
            self.captions[caption] = (name, row)
        self._write_index()
        return name

    def _write_index(self) -> None:
        index = {
            "format": INDEX_FORMAT,
            "fingerprint": self.fingerprint,
            "shards": self.shards,
            "captions": {c: list(loc) for c, loc in self.captions.items()},
        }
        _atomic_write(self.folder / INDEX_NAME, json.dumps(index, ensure_ascii=False).encode("utf-8"))


# -- encoding -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BulkResult:
    captions: int  # as read, duplicates included
    unique: int
    already_done: int  # found in the folder at start
    encoded: int  # sent to the server and saved by this run
    shards_written: int
    seconds: float
    interrupted: bool

    @property
    def captions_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0


def encode_captions(
    captions: Sequence[str],
    out_dir: str | Path,
    encoder: Encoder,
    *,
    concurrency: int = 8,
    request_prompts: int = 4,
    shard_rows: int = 64,
    expected_fingerprint: str | None = None,
    progress: bool = True,
) -> BulkResult:
    """Encode the captions not yet in `out_dir` with `concurrency` requests of `request_prompts` captions
    in flight; save them `shard_rows` per shard. See the module doc for the folder layout."""
    from tqdm.auto import tqdm

    from .remote import FingerprintMismatchError
    from .training import encode_batch, model_info

    for name, value in (("concurrency", concurrency), ("request_prompts", request_prompts), ("shard_rows", shard_rows)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    started = time.monotonic()
    info = model_info(encoder)
    digest = str(info.fingerprint["digest"])
    if expected_fingerprint and digest != expected_fingerprint:
        raise FingerprintMismatchError(f"server serves digest {digest[:16]}…, expected {expected_fingerprint[:16]}…")
    request_prompts = min(request_prompts, info.max_prompts_per_request)
    store = _ShardFolder(Path(out_dir), info.fingerprint)
    unique = list(dict.fromkeys(captions))
    pending = [c for c in unique if c not in store.captions]
    already_done = len(unique) - len(pending)
    batches = iter([pending[i : i + request_prompts] for i in range(0, len(pending), request_prompts)])

    buffer: list[tuple[str, torch.Tensor]] = []
    shards_before = len(store.shards)
    encoded = 0
    interrupted = False
    bar = tqdm(total=len(unique), initial=already_done, unit="caption", disable=not progress, smoothing=0.05)
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="flux2-encode")
    in_flight: dict[Future, list[str]] = {}

    def take(future: Future, batch: list[str]) -> None:
        nonlocal encoded
        embeds, answered_by = future.result()
        if answered_by != digest:  # the fleet was switched to another model mid-run
            raise ShardFingerprintError(f"a response came from model digest {answered_by[:16]}…, not {digest[:16]}…")
        buffer.extend(zip(batch, embeds, strict=True))
        encoded += len(batch)
        bar.update(len(batch))

    try:
        while True:
            while len(in_flight) < 2 * concurrency:  # bounded: results wait in memory until a shard fills
                batch = next(batches, None)
                if batch is None:
                    break
                in_flight[pool.submit(encode_batch, encoder, batch)] = batch
            if not in_flight:
                break
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                take(future, in_flight.pop(future))
            while len(buffer) >= shard_rows:
                store.write_shard(buffer[:shard_rows])
                del buffer[:shard_rows]
    except KeyboardInterrupt:
        interrupted = True
        # Stop sending; keep what the requests already running bring back.
        for future in list(in_flight):
            if future.cancel():
                del in_flight[future]
        for future, batch in in_flight.items():
            # An interrupted run keeps what it can; a failed request is simply encoded on the next run.
            with contextlib.suppress(Exception):
                take(future, batch)
    finally:
        pool.shutdown(wait=not interrupted, cancel_futures=True)
        if buffer:  # also after an error: whatever was encoded is saved
            store.write_shard(buffer)
        bar.close()
    return BulkResult(
        captions=len(captions),
        unique=len(unique),
        already_done=already_done,
        encoded=encoded,
        shards_written=len(store.shards) - shards_before,
        seconds=time.monotonic() - started,
        interrupted=interrupted,
    )


# -- loading ------------------------------------------------------------------------------------------
class EmbeddingShards:
    """Read side of a shard folder: `(prompt_embeds, text_ids)` for a batch of captions.

    The shards are memory-mapped (safetensors `safe_open`); a batch reads only its rows and lands on the
    CPU (or `device`, when given), so the embeddings of a whole data set never sit on the GPU.
    `expected_fingerprint` (a model digest) refuses shards of any other model.
    """

    def __init__(self, folder: str | Path, *, expected_fingerprint: str | None = None):
        self.folder = Path(folder)
        index = json.loads((self.folder / INDEX_NAME).read_text(encoding="utf-8"))
        if index.get("format") != INDEX_FORMAT:
            raise ValueError(f"{self.folder / INDEX_NAME}: not a {INDEX_FORMAT} index")
        self.fingerprint: dict[str, Any] = index["fingerprint"]
        self.digest = str(self.fingerprint["digest"])
        if expected_fingerprint is not None and self.digest != expected_fingerprint:
            raise ShardFingerprintError(
                f"{self.folder} holds embeddings of {self.fingerprint.get('weights_id')} (digest "
                f"{self.digest[:16]}…), expected digest {expected_fingerprint[:16]}…"
            )
        self._locations: dict[str, tuple[str, int]] = {c: (s, r) for c, (s, r) in index["captions"].items()}
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self._locations)

    def __contains__(self, caption: object) -> bool:
        return caption in self._locations

    @property
    def captions(self) -> list[str]:
        return list(self._locations)

    def _shard(self, name: str) -> Any:
        handle = self._handles.get(name)
        if handle is None:
            from safetensors import safe_open

            handle = safe_open(str(self.folder / name), framework="pt")
            meta = handle.metadata() or {}
            if meta.get(META_FINGERPRINT) != self.digest:
                raise ShardFingerprintError(
                    f"{self.folder / name}: made by model digest {str(meta.get(META_FINGERPRINT))[:16]}…, "
                    f"the index says {self.digest[:16]}…"
                )
            self._handles[name] = handle
        return handle

    def prompt_embeds(self, captions: str | Sequence[str]) -> torch.Tensor:
        import torch

        caption_list = [captions] if isinstance(captions, str) else list(captions)
        rows = []
        for caption in caption_list:
            location = self._locations.get(caption)
            if location is None:
                raise KeyError(f"caption not in {self.folder}: {caption[:80]!r}")
            name, row = location
            rows.append(self._shard(name).get_slice(TENSOR_KEY)[row : row + 1])
        return torch.cat(rows, dim=0)

    def get(
        self, captions: str | Sequence[str], *, device: str | torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(prompt_embeds, text_ids)` as `compute_remote_text_embeddings` returns them."""
        from .training import text_ids_for

        prompt_embeds = self.prompt_embeds(captions)
        text_ids = text_ids_for(prompt_embeds)
        if device is not None:
            prompt_embeds, text_ids = prompt_embeds.to(device), text_ids.to(device)
        return prompt_embeds, text_ids


# -- CLI ----------------------------------------------------------------------------------------------
def add_encode_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "encode",
        help="bulk-encode captions into safetensors shards (resumable, deduplicated)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", type=Path, help="captions: .txt (one per line), .jsonl, or an image folder with .txt files")
    p.add_argument("--out", type=Path, required=True, help="output folder (rerun with the same one to resume)")
    p.add_argument("--server", required=True, help="gRPC host:port, or the HTTP /predict URL (http[s]://…)")
    p.add_argument("--token", default=None, help="bearer token for HTTP (default: $FLUX2_ENCODER_TOKEN)")
    p.add_argument("--format", dest="kind", choices=("auto", "text", "jsonl", "images"), default="auto")
    p.add_argument("--field", default="caption", help="JSONL field holding the caption")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--request-prompts", type=int, default=4, help="captions per request")
    p.add_argument("--shard-rows", type=int, default=64, help="captions per shard (15.7 MB each for FLUX.2-dev)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--expect-fingerprint", default=None, help="refuse a server serving any other model digest")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run_encode(args: argparse.Namespace) -> int:
    from .training import open_encoder

    token = args.token or os.environ.get("FLUX2_ENCODER_TOKEN")
    try:
        captions = read_captions(args.input, args.kind, args.field)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"encode: {exc}") from None
    encoder = open_encoder(args.server, token=token, timeout=args.timeout, expected_fingerprint=args.expect_fingerprint)
    try:
        result = encode_captions(
            captions,
            args.out,
            encoder,
            concurrency=args.concurrency,
            request_prompts=args.request_prompts,
            shard_rows=args.shard_rows,
            expected_fingerprint=args.expect_fingerprint,
            progress=not args.no_progress,
        )
    finally:
        encoder.close()
    print(
        f"{result.captions} captions, {result.unique} unique: {result.already_done} already in {args.out}, "
        f"{result.encoded} encoded now in {result.seconds:.1f}s ({result.captions_per_second:.1f} captions/s), "
        f"{result.shards_written} shard(s) written",
        flush=True,
    )
    if result.interrupted:
        print("interrupted: rerun the same command to encode the rest", flush=True)
        return 130
    return 0
