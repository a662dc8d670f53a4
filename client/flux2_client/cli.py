"""`flux2-client`: generate images from a remote encoder's embeddings, build tiny models, run the demo.

flux2-client generate --server HOST:PORT --prompt "a red fox in snow" --out fox.png
flux2-client make-tiny ./tiny-models
flux2-client demo
flux2-client encode captions.txt --server HOST:PORT --out embeds/
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", required=True, help="encoder server address, host:port")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeat for several)")
    p.add_argument("--model", default="black-forest-labs/FLUX.2-dev", help="repo id or folder with vae/ and scheduler/")
    p.add_argument(
        "--dit",
        default="diffusers/FLUX.2-dev-bnb-4bit",
        help="repo id or folder whose transformer/ holds the DiT (NF4, or bf16 quantized on load)",
    )
    p.add_argument("--out", default="flux2.png", help="output PNG; several images get _<n> suffixes")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--guidance", type=float, default=4.0, help="embedded guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu; default cuda if available")
    p.add_argument("--offload", choices=("leaf_level", "none"), default="leaf_level")
    p.add_argument("--timeout", type=float, default=120.0, help="encoder request deadline, seconds")
    p.add_argument("--expect-fingerprint", default=None, help="refuse embeddings from any other model digest")


def check_generate_args(args: argparse.Namespace) -> None:
    """Reject bad values before any model is loaded, naming the argument."""
    for name in ("height", "width"):
        value = getattr(args, name)
        if value < 16 or value % 16:
            raise SystemExit(f"--{name} must be a positive multiple of 16, got {value}")
    if args.steps < 1:
        raise SystemExit(f"--steps must be at least 1, got {args.steps}")
    if any(not p.strip() for p in args.prompt):
        raise SystemExit("--prompt must not be empty")


def run_generate(args: argparse.Namespace) -> list[Path]:
    check_generate_args(args)
    try:
        from .generation import GenerationParams, generate, load_pipeline, save_png
        from .remote import RemoteTextEncoder
    except ImportError as exc:
        raise SystemExit(f"missing dependency {exc.name!r}: pip install 'flux2-split[client]'") from None

    with RemoteTextEncoder(args.server, timeout=args.timeout, expected_fingerprint=args.expect_fingerprint) as enc:
        encoded = enc.encode(args.prompt)
    fp = encoded.fingerprint
    print(f"received embeddings {tuple(encoded.prompt_embeds.shape)} from {fp.weights_id} ({fp.digest[:12]})")
    pipe = load_pipeline(args.model, dit=args.dit, device=args.device, offload=args.offload)
    params = GenerationParams(args.height, args.width, args.steps, args.guidance, args.seed)
    images = generate(pipe, encoded.prompt_embeds, params)
    out = Path(args.out)
    paths = []
    for i, (prompt, image) in enumerate(zip(args.prompt, images, strict=True)):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}_{i}{out.suffix}")
        meta = {
            "prompt": prompt,
            "seed": args.seed,
            "steps": args.steps,
            "guidance": args.guidance,
            "height": args.height,
            "width": args.width,
            "encoder_model": fp.weights_id,
            "encoder_fingerprint": fp.digest,
            "dit": args.dit,
        }
        paths.append(save_png(image, path, meta))
        print(f"wrote {path}")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="flux2-client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate images from prompts encoded by a server")
    _add_generate_args(gen)
    tiny = sub.add_parser("make-tiny", help="write tiny random FLUX.2-dev-shaped models (HF layout)")
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--overwrite", action="store_true")
    demo = sub.add_parser("demo", help="tiny models -> server -> image, all on this machine")
    demo.add_argument("--workdir", type=Path, default=Path("out/demo"))
    demo.add_argument(
        "--model",
        default=None,
        help="real weights instead of tiny ones, e.g. black-forest-labs/FLUX.2-dev (needs HF_TOKEN and a GPU)",
    )
    demo.add_argument("--prompt", default="a watercolor fox reading a newspaper in a cafe")
    from .bulk import add_encode_parser

    add_encode_parser(sub)
    args = parser.parse_args(argv)

    if args.command == "generate":
        run_generate(args)
    elif args.command == "make-tiny":
        from .tiny import make_tiny_flux2

        paths = make_tiny_flux2(args.out_dir, seed=args.seed, overwrite=args.overwrite)
        print(f"pipeline: {paths.pipeline}\nNF4 DiT:  {paths.nf4_repo}")
    elif args.command == "demo":
        from .demo import run_demo

        run_demo(args.workdir, model=args.model, prompt=args.prompt)
    elif args.command == "encode":
        from .bulk import run_encode

        return run_encode(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
