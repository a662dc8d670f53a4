"""`flux2-client`: generate images from a remote encoder's embeddings, build tiny models, run the demo.

flux2-client generate --server HOST:PORT --prompt "a red fox in snow" --out fox.png
flux2-client generate --server A:PORT --server B:PORT --vram 8GB --image cat.png --image hat.png \
    --prompt "the cat wearing the hat" --num-images-per-prompt 2
flux2-client generate --plan-only --vram 6GB --image a.png --image b.png
flux2-client generate --server HOST:PORT --prompt "a fox" --lora out/pytorch_lora_weights.safetensors:0.8 --turbo
flux2-client make-tiny ./tiny-models [--family klein]
flux2-client demo
flux2-client encode captions.txt --server HOST:PORT --out embeds/
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

# Pure-Python modules only: the CLI must start (and reject bad arguments) without torch.
from ._pool_args import add_pool_args, pool_from_args
from .lora import LoraSpec
from .planner import MAX_REFERENCE_IMAGES, OFFLOAD_CHOICES, Workload, parse_size
from .step_cache import CACHE_CHOICES
from .turbo import TURBO_GUIDANCE, TURBO_REPO, TURBO_STEPS

if TYPE_CHECKING:
    from .generation import GenerationParams

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 4.0


def _add_generate_args(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--steps", type=int, default=None, help=f"denoising steps (default {DEFAULT_STEPS})")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="guidance scale: embedded (FLUX.2-dev), classifier-free (FLUX.2 [klein] base), ignored (klein distilled); "
        f"default {DEFAULT_GUIDANCE} ({TURBO_GUIDANCE} with --turbo)",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH_OR_REPO[:SCALE]",
        help="a LoRA for the DiT (repeat for several): a .safetensors file, a folder or Hub repo holding "
        "pytorch_lora_weights.safetensors or one .safetensors, or owner/name/file.safetensors; scale 1 by default",
    )
    p.add_argument(
        "--turbo",
        action="store_true",
        help=f"FLUX.2-dev Turbo: the {TURBO_REPO} LoRA, {TURBO_STEPS} steps on its model card's sigmas",
    )
    p.add_argument(
        "--cache",
        choices=CACHE_CHOICES,
        default=None,
        help="a diffusers step cache: blocks it skips on a step are neither computed nor streamed on that step "
        "(mag: FLUX.1's ratios; taylorseer: lite mode; first-block: refused on FLUX.2 by diffusers 0.42.1)",
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
    p.add_argument("--cache-dir", type=Path, default=None, help="keep received embeddings here (safetensors)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_pool_args(p, timeout=120.0)


def check_generate_args(args: argparse.Namespace) -> None:
    """Reject bad values before any model is loaded, naming the argument."""
    for name in ("height", "width"):
        value = getattr(args, name)
        if value < 16 or value % 16:
            raise SystemExit(f"--{name} must be a positive multiple of 16, got {value}")
    if args.turbo:
        if args.steps is not None and args.steps != TURBO_STEPS:
            raise SystemExit(f"--steps: --turbo runs the {TURBO_STEPS} steps of its sigmas, got {args.steps}")
        args.steps = TURBO_STEPS
    args.steps = DEFAULT_STEPS if args.steps is None else args.steps
    args.guidance = (TURBO_GUIDANCE if args.turbo else DEFAULT_GUIDANCE) if args.guidance is None else args.guidance
    if args.steps < 1:
        raise SystemExit(f"--steps must be at least 1, got {args.steps}")
    try:
        args.lora = [LoraSpec.parse(text) for text in args.lora]
    except ValueError as exc:
        raise SystemExit(f"--{exc}") from None
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
    if args.turbo:
        from .families import detect_family

        if detect_family(args.model, dit=args.dit).is_klein:
            raise SystemExit(f"--turbo: the {TURBO_REPO} LoRA is for FLUX.2-dev, not FLUX.2 [klein]")
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
    """The plan from the DiT's config alone: nothing is loaded or downloaded beyond config.json (and the LoRA
    files, whose headers count the adapters and whose bytes are hashed)."""
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
    from .generation import describe_recipe, load_reference_images
    from .lora import LoraSourceError, lora_file_adapter_bytes, resolve_loras

    sizes = [im.size for im in load_reference_images(args.image)]
    spec = spec_from_config(config, double_quant=double_quant, vae_bytes=170 << 20)
    try:
        loras = resolve_loras(_lora_specs(args))
    except LoraSourceError as exc:
        raise SystemExit(f"--{exc}") from None
    if loras:  # the adapters stay resident: counted from the files' headers
        counts = [lora_file_adapter_bytes(lora.file) for lora in loras]
        adapter_bytes, widest = sum(n for n, _ in counts), max(w for _, w in counts)
        spec = dataclasses.replace(spec, adapter_bytes=adapter_bytes, adapter_out_features=widest)
    plan = plan_memory(spec, _workload(args, sizes), Budget(vram=vram, host_available=host_available_bytes()))
    text = plan.describe()
    recipe = describe_recipe(loras, _params(args), args.turbo)
    if recipe:
        text += "\n" + recipe
    print(text)
    return text


def _lora_specs(args: argparse.Namespace) -> list[LoraSpec]:
    from .turbo import TURBO_LORA

    return [*args.lora, TURBO_LORA] if args.turbo else list(args.lora)


def _params(args: argparse.Namespace) -> GenerationParams:
    from .generation import GenerationParams
    from .turbo import TURBO_SIGMAS

    sigmas = TURBO_SIGMAS if args.turbo else None
    return GenerationParams(
        args.height, args.width, args.steps, args.guidance, args.seed, sigmas=sigmas, step_cache=args.cache
    )


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
        from .generation import GenerationParams, generate_to_files
    except ImportError as exc:
        raise SystemExit(f"missing dependency {exc.name!r}: pip install 'flux2-split[client]'") from None

    from .families import EmbeddingWidthError
    from .lora import LoraKeyError, LoraSourceError
    from .planner import PlanError
    from .step_cache import StepCacheUnsupported

    cache = EmbeddingCache(args.cache_dir) if args.cache_dir else None
    with pool_from_args(args, cache=cache) as pool:
        try:
            return generate_to_files(
                pool,
                args.prompt,
                args.out,
                GenerationParams(args.height, args.width, args.steps, args.guidance, args.seed, step_cache=args.cache),
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
                loras=args.lora,
                turbo=args.turbo,
            )
        except (LoraSourceError, LoraKeyError) as exc:
            raise SystemExit(f"--{exc}") from None
        except StepCacheUnsupported as exc:
            raise SystemExit(f"--cache: {exc}") from None
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

        run_demo(args.workdir, model=args.model, prompt=args.prompt)
    elif args.command == "encode":
        from .bulk import run_encode

        return run_encode(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
