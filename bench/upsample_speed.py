"""Prompt upsampling speed, and what it costs the encode path while both run (issue 16).

Builds Mistral Small 3.1 (FLUX.2-dev's text encoder: 40 layers, output head, vision tower) at its real shape
with random bf16 weights on the GPU, and serves it the way `--upsampling` does: one model, the engine
running its first 30 layers (`EncoderEngine.from_model`, no copy) and an `Upsampler` generating with the
whole of it, through a real gRPC server on localhost (`flux2_encoder_server.testing.ServerThread`).

  upsample   sequential Upsample requests (1 prompt, --new-tokens tokens each; random weights rarely end
             the text early): generated tokens/s and seconds per request
  encode     --clients threads sending one-prompt Encode requests for --seconds: prompts/s
  mixed      the same encode load plus --upsamplers threads sending Upsample requests back to back:
             prompts/s of the encode path and tokens/s of upsampling, at each --share

    python -m bench.upsample_speed --out results/                  # on the GPU machine
    python -m bench.upsample_speed --tiny --device cpu --seconds 5 --new-tokens 4 --out /tmp/u   # the script itself

Tokens come from the byte-level tokenizer of flux2_client.tiny (Tekken's special ids): the work per token
is the real one whatever the vocabulary; every conversation is padded to 2048 tokens as diffusers does.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path
from typing import Any

import torch

from ._measure import GIB, Report, log, sync
from ._models import build_encoder, prompts


def _server(engine: Any, upsampler: Any, share: float, args: argparse.Namespace) -> Any:
    from flux2_encoder_server.testing import FakeEngine, ServerThread, local_settings

    fake = FakeEngine(engine)
    fake.upsampler = upsampler  # what `EncoderEngine.from_pretrained(upsampling=True)` attaches
    settings = local_settings(
        "bench",
        device=args.device,
        upsampling=True,
        upsample_share=share,
        upsample_max_new_tokens=max(args.new_tokens, 1),
        max_batch_prompts=args.batch,
        cache_bytes=0,
    )
    return ServerThread(settings, lambda _s: fake).start()


def _load(target: str, seconds: float, clients: int, upsamplers: int, new_tokens: int) -> dict[str, float]:
    """Encode clients and upsampling clients for `seconds`; counts what finished in that time."""
    from flux2_client.encoder import UpsampleOptions
    from flux2_client.remote import RemoteTextEncoder

    stop = time.monotonic() + seconds
    done = {"prompts": 0, "upsamples": 0, "tokens": 0}
    ended = {"encode": 0.0, "upsample": 0.0}  # when the last request of each kind ended
    lock = threading.Lock()
    pool = prompts(256, seed=1)

    def encode_loop(k: int) -> None:
        with RemoteTextEncoder(target, timeout=600) as client:
            i = k
            while time.monotonic() < stop:
                client.encode([pool[i % len(pool)]], bypass_cache=True)
                i += clients
                with lock:
                    done["prompts"] += 1
                    ended["encode"] = max(ended["encode"], time.monotonic())

    def upsample_loop(k: int) -> None:
        options = UpsampleOptions(temperature=0.15, max_new_tokens=new_tokens)
        with RemoteTextEncoder(target, timeout=600) as client:
            i = k
            while time.monotonic() < stop:
                result = client.upsample([pool[i % len(pool)]], options)
                i += upsamplers
                with lock:
                    done["upsamples"] += 1
                    done["tokens"] += sum(result.new_tokens)
                    ended["upsample"] = max(ended["upsample"], time.monotonic())

    threads = [threading.Thread(target=encode_loop, args=(k,)) for k in range(clients)]
    threads += [threading.Thread(target=upsample_loop, args=(k,)) for k in range(upsamplers)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started  # includes the requests in flight when time ran out
    # Each rate over its own kind's time, from the start to its last answer (a long upsampling request
    # still running when the encode clients stop must not dilute the encode rate, nor the reverse).
    encode_s = max(ended["encode"] - started, 1e-9)
    upsample_s = max(ended["upsample"] - started, 1e-9)
    return {
        "seconds": round(elapsed, 2),
        "encode_seconds": round(encode_s, 2) if done["prompts"] else None,
        "encode_prompts": done["prompts"],
        "encode_prompts_per_s": round(done["prompts"] / encode_s, 2) if done["prompts"] else 0.0,
        "upsample_seconds": round(upsample_s, 2) if done["upsamples"] else None,
        "upsample_requests": done["upsamples"],
        "upsample_tokens_per_s": round(done["tokens"] / upsample_s, 2) if done["upsamples"] else 0.0,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for upsample_speed.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny model (checks the script, measures nothing)")
    parser.add_argument("--new-tokens", type=int, default=512, help="tokens per upsampled prompt (diffusers: 512)")
    parser.add_argument("--requests", type=int, default=3, help="sequential Upsample requests in `upsample`")
    parser.add_argument("--clients", type=int, default=32, help="concurrent encode clients")
    parser.add_argument("--upsamplers", type=int, default=2, help="concurrent upsampling clients in `mixed`")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each load run")
    parser.add_argument("--batch", type=int, default=16, help="--max-batch-prompts of the server")
    parser.add_argument("--share", type=float, nargs="+", default=[0.1, 0.25, 0.5], help="--upsample-share values")
    args = parser.parse_args(argv)

    from flux2_client.tiny import build_tiny_tokenizer
    from flux2_encoder_server import EncoderEngine
    from flux2_encoder_server.upsample import Upsampler

    report = Report(args.out, "upsample_speed")
    report["args"] = vars(args) | {"out": str(args.out)}
    if args.device.startswith("cuda"):
        report["device"] = torch.cuda.get_device_name()
    full = build_encoder(args.tiny, args.device)
    tokenizer = build_tiny_tokenizer(model_max_length=2048)
    engine = EncoderEngine.from_model(full, tokenizer, weights_id="random-mistral-small-3.1")
    upsampler = Upsampler(full, tokenizer, tokenizer_lock=engine.tokenizer_lock)
    if args.device.startswith("cuda"):
        report["weights_gib"] = round(torch.cuda.memory_allocated() / GIB, 2)

    server = _server(engine, upsampler, args.share[0], args)
    try:
        with report.section("upsample"):
            from flux2_client.encoder import UpsampleOptions
            from flux2_client.remote import RemoteTextEncoder

            options = UpsampleOptions(temperature=0.15, max_new_tokens=args.new_tokens, seed=0)
            with RemoteTextEncoder(server.target, timeout=3600) as client:
                client.upsample(["warm-up"], UpsampleOptions(max_new_tokens=2))
                runs = []
                for i in range(args.requests):
                    sync(args.device)
                    started = time.monotonic()
                    result = client.upsample([prompts(1, seed=i)[0]], options)
                    runs.append((time.monotonic() - started, sum(result.new_tokens)))
            report["upsample"] = {
                "seconds_per_request": [round(s, 3) for s, _ in runs],
                "tokens": [n for _, n in runs],
                "tokens_per_s": round(sum(n for _, n in runs) / sum(s for s, _ in runs), 2),
            }
            log(report["upsample"])
        with report.section("encode"):
            report["encode"] = _load(server.target, args.seconds, args.clients, 0, args.new_tokens)
            log(report["encode"])
    finally:
        server.stop()
    report["mixed"] = {}
    for share in args.share:
        with report.section(f"mixed share={share}"):
            server = _server(engine, upsampler, share, args)
            try:
                report["mixed"][str(share)] = _load(
                    server.target, args.seconds, args.clients, args.upsamplers, args.new_tokens
                )
            finally:
                server.stop()
            log(share, report["mixed"][str(share)])
    report.save()
    log(f"wrote {report.path}")


if __name__ == "__main__":
    main()
