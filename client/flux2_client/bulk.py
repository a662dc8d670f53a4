"""Bulk caption encoding into a shard folder (`flux2-client encode`), through an `EncoderPool`.

    flux2-client encode captions.txt --server encoder:50051 --out embeds/
    flux2-client encode data.jsonl --field text --server https://encoder.example/predict --out embeds/
    flux2-client encode dreambooth_images/ --server enc-a:50051 --server enc-b:50051 --out embeds/

The folder layout is `shards.py`'s (safetensors shards + index.json); the readers are `captions.py`'s.
Running the same command again resumes: it adopts every complete shard and encodes only the captions that
are in none. Identical captions are encoded once. Requests go through the pool, so a server that dies
mid-run is skipped and its requests are sent to another. Ctrl-C stops sending, waits for the requests in
flight and saves them, so nothing already encoded is lost.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._pool_args import add_pool_args

if TYPE_CHECKING:
    import torch

    from .encoder import Encoder, EncodeResult

__all__ = ["BulkResult", "encode_captions"]


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
    encoder: Encoder | str | Sequence[str],
    *,
    concurrency: int = 8,
    request_prompts: int = 4,
    shard_rows: int = 64,
    expected_fingerprint: str | None = None,
    progress: bool = True,
) -> BulkResult:
    """Encode the captions not yet in `out_dir` with `concurrency` requests of `request_prompts` captions
    in flight; save them `shard_rows` per shard.

    `encoder`: an `EncoderPool` (or any `Encoder`), or target(s) to open a pool over for this run."""
    from flux2split_proto import shared
    from tqdm.auto import tqdm

    from .encoder import FingerprintMismatchError
    from .endpoints import using_encoder
    from .shards import ShardFingerprintError, ShardWriter

    for name, value in (("concurrency", concurrency), ("request_prompts", request_prompts), ("shard_rows", shard_rows)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    with using_encoder(encoder, expected_fingerprint=expected_fingerprint) as enc:
        started = time.monotonic()
        info = enc.info()
        digest = info.fingerprint.digest
        if expected_fingerprint and digest != expected_fingerprint:
            raise FingerprintMismatchError(
                shared.fingerprint_mismatch_message(expected_fingerprint, digest, info.fingerprint.weights_id)
            )
        if info.limits.max_prompts_per_request > 0:
            request_prompts = min(request_prompts, info.limits.max_prompts_per_request)
        store = ShardWriter(Path(out_dir), info.fingerprint)
        unique = list(dict.fromkeys(captions))
        pending = [c for c in unique if c not in store.captions]
        already_done = len(unique) - len(pending)
        batches = iter([pending[i : i + request_prompts] for i in range(0, len(pending), request_prompts)])

        buffer: list[tuple[str, torch.Tensor]] = []
        shards_before = len(store.shards)
        encoded = 0
        interrupted = False
        bar = tqdm(total=len(unique), initial=already_done, unit="caption", disable=not progress, smoothing=0.05)
        threads = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="flux2-encode")
        in_flight: dict[Future[EncodeResult], list[str]] = {}

        def take(future: Future[EncodeResult], batch: list[str]) -> None:
            nonlocal encoded
            result = future.result()
            if result.fingerprint.digest != digest:  # the fleet was switched to another model mid-run
                raise ShardFingerprintError(
                    f"a response came from model digest {result.fingerprint.digest[:16]}…, not {digest[:16]}…"
                )
            buffer.extend(zip(batch, result.prompt_embeds, strict=True))
            encoded += len(batch)
            bar.update(len(batch))

        try:
            while True:
                while len(in_flight) < 2 * concurrency:  # bounded: results wait in memory until a shard fills
                    batch = next(batches, None)
                    if batch is None:
                        break
                    in_flight[threads.submit(enc.encode, batch)] = batch
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
            threads.shutdown(wait=not interrupted, cancel_futures=True)
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


# -- the `encode` command -------------------------------------------------------------------------------
def add_encode_parser(sub: Any) -> argparse.ArgumentParser:
    from .shards import __doc__ as layout

    p = sub.add_parser(
        "encode",
        help="bulk-encode captions into safetensors shards (resumable, deduplicated)",
        description=f"{__doc__}\n{layout}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", type=Path, help="captions: .txt (one per line), .jsonl, or an image folder with .txt files")
    p.add_argument("--out", type=Path, required=True, help="output folder (rerun with the same one to resume)")
    add_pool_args(p, timeout=300.0)
    p.add_argument("--format", dest="kind", choices=("auto", "text", "jsonl", "images"), default="auto")
    p.add_argument("--field", default="caption", help="JSONL field holding the caption")
    p.add_argument(
        "--bad-lines",
        choices=("error", "skip"),
        default="error",
        help="a line that is not valid UTF-8: stop and name it (default), or skip it and report the count",
    )
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--request-prompts", type=int, default=4, help="captions per request")
    p.add_argument("--shard-rows", type=int, default=64, help="captions per shard (15.7 MB each for FLUX.2-dev)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run_encode(args: argparse.Namespace) -> int:
    from ._pool_args import pool_from_args
    from .captions import read_captions

    skipped: list[int] = []
    try:
        captions = read_captions(
            args.input, args.kind, args.field, bad_lines=args.bad_lines, on_skip=lambda line, _why: skipped.append(line)
        )
    except (OSError, ValueError) as exc:
        raise SystemExit(f"encode: {exc}") from None
    if skipped:
        shown = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
        print(f"encode: skipped {len(skipped)} line(s) that are not valid UTF-8: {shown}", file=sys.stderr)
    # A server or fingerprint failure propagates to the CLI's edge (`cli.main`), which reports it in one line
    # with the exit code of its class; what was encoded before it is saved, so rerunning resumes.
    with pool_from_args(args) as pool:
        result = encode_captions(
            captions,
            args.out,
            pool,
            concurrency=args.concurrency,
            request_prompts=args.request_prompts,
            shard_rows=args.shard_rows,
            expected_fingerprint=args.expect_fingerprint,
            progress=not args.no_progress,
        )
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
