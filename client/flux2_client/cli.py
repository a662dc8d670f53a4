"""`flux2-client`: generate images from a remote encoder's embeddings, build tiny models, run the demo.

flux2-client generate --server HOST:PORT --prompt "a red fox in snow" --out fox.png
flux2-client generate --server A:PORT --server B:PORT --vram 8GB --image cat.png --image hat.png \
    --prompt "the cat wearing the hat" --num-images-per-prompt 2
flux2-client generate --plan-only --vram 6GB --image a.png --image b.png
flux2-client make-tiny ./tiny-models [--family klein]
flux2-client demo
flux2-client encode captions.txt --server HOST:PORT --out embeds/
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

# Pure-Python modules only: the CLI must start (and reject bad arguments) without torch.
from .planner import MAX_REFERENCE_IMAGES, OFFLOAD_CHOICES, Workload, parse_size


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        action="append",
        default=[],
        help="encoder server address, host:port (repeat for several: requests spread, failed servers are skipped)",
    )
    p.add_argument("--prompt", action="append", default=[], help="prompt (repeat for several)")
    p.add_argument("--image", action="append", default=[], type=Path, help="reference image (repeat, up to 10)")
    p.add_argument(
        "--model",
        default="black-forest-labs/FLUX.2-dev",
        help="repo id or folder with vae/ and scheduler/: FLUX.2-dev or a FLUX.2 [klein] model (its model_index.json "
        "picks Flux2Pipeline or Flux2KleinPipeline)",
    )
    p.add_argument(
        "--dit",
        default=None,
        help="repo id or folder whose transformer/ holds the DiT (NF4, or bf16 quantized on load); default "
        "diffusers/FLUX.2-dev-bnb-4bit for FLUX.2-dev, else --model's own transformer/",
    )
    p.add_argument("--out", default="flux2.png", help="output PNG; several images get _<prompt>_<n> suffixes")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument(
        "--guidance",
        type=float,
        default=4.0,
        help="guidance scale: embedded (FLUX.2-dev), classifier-free (FLUX.2 [klein] base), ignored (klein distilled)",
    )
    p.add_argument(
        "--negative-prompt",
        default="",
        help="FLUX.2 [klein] base models: the negative prompt of classifier-free guidance, encoded by the server",
    )
    p.add_argument("--seed", type=int, default=0, help="image k of the call uses seed + k")
    p.add_argument("--num-images-per-prompt", type=int, default=1)
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu; default cuda if available")
    p.add_argument(
        "--offload",
        choices=OFFLOAD_CHOICES,
        default=None,
        help="plan: memory planner (default on CUDA); leaf_level: diffusers' recipe; none: all on the device",
    )
    p.add_argument("--vram", default=None, help="VRAM budget for everything on the card, e.g. 8GB; default: free now")
    p.add_argument("--plan-only", action="store_true", help="print the memory plan from the model config and exit")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline of one encoder request, seconds")
    p.add_argument("--deadline", type=float, default=None, help="deadline over all retries and servers, seconds")
    p.add_argument("--retries", type=int, default=6, help="encoder attempts over all servers")
    p.add_argument("--cache-dir", type=Path, default=None, help="keep received embeddings here (safetensors)")
    p.add_argument("--expect-fingerprint", default=None, help="refuse embeddings from any other model digest")
    p.add_argument(
        "--token",
        default=None,
        help="bearer token for the encoder servers (default: the FLUX2_ENCODER_TOKEN environment variable)",
    )
    p.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --root-certs)")
    p.add_argument("--root-certs", type=Path, default=None, help="PEM CA bundle of the servers' certificates")
    p.add_argument("--client-cert", type=Path, default=None, help="PEM certificate chain for mutual TLS")
    p.add_argument("--client-key", type=Path, default=None, help="PEM private key for mutual TLS")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def client_options(args: argparse.Namespace) -> dict:
    """RemoteTextEncoder's auth/TLS options from the CLI (the one place the client reads the environment)."""
    if (args.client_cert is None) != (args.client_key is None):
        raise SystemExit("--client-cert and --client-key go together (mutual TLS)")

    def read(path: Path | None) -> bytes | None:
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError as exc:
            raise SystemExit(f"cannot read {path}: {exc}") from None

    return {
        "token": args.token or os.environ.get("FLUX2_ENCODER_TOKEN") or None,
        "tls": args.tls,
        "root_certificates": read(args.root_certs),
        "client_certificate": read(args.client_cert),
        "client_private_key": read(args.client_key),
    }


def check_generate_args(args: argparse.Namespace) -> None:
    """Reject bad values before any model is loaded, naming the argument."""
    for name in ("height", "width"):
        value = getattr(args, name)
        if value < 16 or value % 16:
            raise SystemExit(f"--{name} must be a positive multiple of 16, got {value}")
    if args.steps < 1:
        raise SystemExit(f"--steps must be at least 1, got {args.steps}")
    if args.num_images_per_prompt < 1:
        raise SystemExit(f"--num-images-per-prompt must be at least 1, got {args.num_images_per_prompt}")
    if len(args.image) > MAX_REFERENCE_IMAGES:
        raise SystemExit(f"--image: at most {MAX_REFERENCE_IMAGES} reference images, got {len(args.image)}")
    for path in args.image:
        if not path.is_file():
            raise SystemExit(f"--image: no such file {path}")
    if args.vram is not None:
        try:
            parse_size(args.vram)
        except ValueError as exc:
            raise SystemExit(f"--vram: {exc}") from None
    if args.dit is None:
        from .families import default_dit

        args.dit = default_dit(args.model)
    if args.plan_only:
        return
    if not args.prompt:
        raise SystemExit("--prompt is required (repeat it for several prompts)")
    if any(not p.strip() for p in args.prompt):
        raise SystemExit("--prompt must not be empty")
    if not args.server:
        raise SystemExit("--server is required (repeat it for several servers)")


def _workload(args: argparse.Namespace, image_sizes: list[tuple[int, int]]) -> Workload:
    batch = max(1, len(args.prompt)) * args.num_images_per_prompt
    return Workload(args.height, args.width, tuple(image_sizes), batch)


def run_plan_only(args: argparse.Namespace) -> str:
    """The plan from the DiT's config alone: nothing is loaded or downloaded beyond config.json."""
    import json

    from ._quantization import _is_prequantized
    from .planner import Budget, plan_memory, spec_from_config

    config_path = Path(args.dit) / "transformer" / "config.json"
    if not config_path.is_file():
        from huggingface_hub import hf_hub_download

        config_path = Path(hf_hub_download(args.dit, "transformer/config.json"))
    config = json.loads(config_path.read_text())
    double_quant = bool(config.get("quantization_config", {}).get("bnb_4bit_use_double_quant", False))
    if not _is_prequantized(args.dit, "transformer"):
        double_quant = False
    if args.vram is not None:
        vram = parse_size(args.vram)
    else:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--vram is needed without a CUDA device (no free memory to read)")
        from ._allocator import auto_vram_bytes

        vram = auto_vram_bytes(torch.device("cuda", torch.cuda.current_device()))
    from ._allocator import host_available_bytes
    from .generation import load_reference_images

    sizes = [im.size for im in load_reference_images(args.image)]
    spec = spec_from_config(config, double_quant=double_quant, vae_bytes=170 << 20)
    plan = plan_memory(spec, _workload(args, sizes), Budget(vram=vram, host_available=host_available_bytes()))
    text = plan.describe()
    print(text)
    return text


def run_generate(args: argparse.Namespace) -> list[Path]:
    check_generate_args(args)
    # The allocator reads this once, when CUDA starts: set it before anything touches the GPU.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    try:
        if args.plan_only:
            from .planner import PlanError

            try:
                run_plan_only(args)
            except PlanError as exc:
                raise SystemExit(f"--vram: {exc}") from None
            return []
        from .cache import EmbeddingCache
        from .endpoints import EncoderPool, RetryPolicy
        from .generation import GenerationParams, generate_to_files
    except ImportError as exc:
        raise SystemExit(f"missing dependency {exc.name!r}: pip install 'flux2-split[client]'") from None

    from .families import EmbeddingWidthError
    from .planner import PlanError

    cache = EmbeddingCache(args.cache_dir) if args.cache_dir else None
    retry = RetryPolicy(attempts=args.retries, deadline=args.deadline)
    with EncoderPool(
        args.server,
        timeout=args.timeout,
        expected_fingerprint=args.expect_fingerprint,
        retry=retry,
        cache=cache,
        **client_options(args),
    ) as pool:
        try:
            return generate_to_files(
                pool,
                args.prompt,
                args.out,
                GenerationParams(args.height, args.width, args.steps, args.guidance, args.seed),
                model=args.model,
                dit=args.dit,
                images=args.image,
                num_images_per_prompt=args.num_images_per_prompt,
                device=args.device,
                offload=args.offload,
                vram=args.vram,
                progress=not args.no_progress,
                verbose=True,
                negative_prompt=args.negative_prompt,
            )
        except EmbeddingWidthError as exc:
            raise SystemExit(f"--dit: {exc}") from None
        except PlanError as exc:
            raise SystemExit(f"--vram: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="flux2-client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate images from prompts encoded by a server")
    _add_generate_args(gen)
    tiny = sub.add_parser("make-tiny", help="write tiny random FLUX.2-dev- or klein-shaped models (HF layout)")
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--family", choices=("flux2", "klein"), default="flux2", help="FLUX.2-dev or FLUX.2 [klein]")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--overwrite", action="store_true")
    demo = sub.add_parser("demo", help="encoder server + image on this machine (tiny models, or real ones on one GPU)")
    demo.add_argument("--workdir", type=Path, default=Path("out/demo"))
    demo.add_argument(
        "--model",
        default=None,
        help="real weights instead of tiny ones, e.g. black-forest-labs/FLUX.2-dev (needs HF_TOKEN and a GPU)",
    )
    demo.add_argument("--dit", default=None, help="as for generate; default: --model's NF4 DiT")
    demo.add_argument(
        "--encoder-precision",
        choices=("bf16", "fp8", "int8", "nf4"),  # the server's --precision tiers
        default="bf16",
        help="the server's encoder weights: bf16 (exact) needs ~36 GiB beside the DiT for FLUX.2-dev; int8 fits a "
        "24 GB card and nf4 a 16 GB one, with embeddings that differ from diffusers' (README, One machine)",
    )
    demo.add_argument(
        "--vram",
        default=None,
        help="what the server and the DiT may hold on the card together, e.g. 24GB; default: the whole card",
    )
    demo.add_argument("--prompt", default="a watercolor fox reading a newspaper in a cafe")
    from .bulk import add_encode_parser

    add_encode_parser(sub)
    args = parser.parse_args(argv)

    if args.command == "generate":
        run_generate(args)
    elif args.command == "make-tiny" and args.family == "klein":
        from .tiny_klein import make_tiny_klein

        klein = make_tiny_klein(args.out_dir, seed=args.seed, overwrite=args.overwrite)
        print(f"distilled: {klein.distilled}\nbase:      {klein.base}\nNF4 DiT:   {klein.nf4_repo}")
    elif args.command == "make-tiny":
        from .tiny import make_tiny_flux2

        paths = make_tiny_flux2(args.out_dir, seed=args.seed, overwrite=args.overwrite)
        print(f"pipeline: {paths.pipeline}\nNF4 DiT:  {paths.nf4_repo}")
    elif args.command == "demo":
        from .demo import run_demo

        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts

        if args.vram is not None:
            try:
                parse_size(args.vram)
            except ValueError as exc:
                raise SystemExit(f"--vram: {exc}") from None
        if args.model is not None:
            import torch

            if not torch.cuda.is_available():
                raise SystemExit("--model: real weights need a CUDA GPU; without --model the demo runs tiny models")
        from .planner import PlanError

        try:
            run_demo(
                args.workdir,
                model=args.model,
                prompt=args.prompt,
                dit=args.dit,
                encoder_precision=args.encoder_precision,
                vram=args.vram,
            )
        except PlanError as exc:
            raise SystemExit(f"--vram: {exc}") from None
    elif args.command == "encode":
        from .bulk import run_encode

        return run_encode(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
