"""`flux2-client`: generate images from a remote encoder's embeddings, build tiny models, run the demo.

flux2-client generate --server HOST:PORT --prompt "a red fox in snow" --out fox.png
flux2-client generate --server A:PORT --server B:PORT --vram 8GB --image cat.png --image hat.png \\
    --prompt "the cat wearing the hat" --num-images-per-prompt 2
flux2-client generate --plan-only --vram 6GB --image a.png --image b.png
flux2-client generate --server HOST:PORT --prompt "a fox" --lora out/pytorch_lora_weights.safetensors:0.8 --turbo
flux2-client make-tiny ./tiny-models [--family klein]
flux2-client demo [--family klein]
flux2-client encode captions.txt --server HOST:PORT --out embeds/

A failure is one line on stderr and an exit code (below); --verbose adds the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from . import __version__

# Pure-Python modules only: the CLI must start (and reject bad arguments) without torch.
from ._arg_types import MIN_VRAM, at_least_one, finite_float, join_signed_values, vram_size
from ._errors import CliError, ExitCode, FailureContext, UsageError, describe_failure, exit_code_table, servers_of
from ._pool_args import add_pool_args, pool_from_args
from .lora import LoraSpec
from .planner import MAX_REFERENCE_IMAGES, OFFLOAD_CHOICES, Workload, fmt_bytes, parse_size
from .step_cache import CACHE_CHOICES
from .turbo import TURBO_GUIDANCE, TURBO_REPO, TURBO_STEPS

if TYPE_CHECKING:
    from .generation import GenerationParams

_log = logging.getLogger(__name__)
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 4.0


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (no usage block) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(ExitCode.USAGE)


# -- the parser -----------------------------------------------------------------------------------------------
def _add_output_args(p: argparse.ArgumentParser, *, top: bool = False) -> None:
    """--verbose/--quiet/--log-format, accepted before and after the command. The copies on the commands
    default to SUPPRESS so they never overwrite a value given before the command."""
    default: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "-v", "--verbose", action="store_true", help="more detail; a failure adds its traceback", **default
    )
    group.add_argument(
        "-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars", **default
    )
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        help="text (default): lines for people; json: one JSON object per line on stderr, no progress bars",
        **({"default": "text"} if top else default),
    )


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", action="append", default=[], help="prompt (repeat for several)")
    p.add_argument("--image", action="append", default=[], type=Path, help="reference image (repeat, up to 10)")
    p.add_argument(
        "--model",
        default="black-forest-labs/FLUX.2-dev",
        help="repo id or folder with vae/ and scheduler/: FLUX.2-dev or a FLUX.2 [klein] model (its model_index.json "
        "picks Flux2Pipeline or Flux2KleinPipeline)",
    )
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of --model")
    p.add_argument(
        "--dit",
        default=None,
        help="repo id or folder whose transformer/ holds the DiT (NF4, or bf16 quantized on load); default "
        "diffusers/FLUX.2-dev-bnb-4bit for FLUX.2-dev, else --model's own transformer/",
    )
    p.add_argument(
        "--dit-revision", default=None, help="hub revision of --dit (default: --revision when --dit is not given)"
    )
    p.add_argument("--out", default="flux2.png", help="output PNG; several images get _<prompt>_<n> suffixes")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=at_least_one, default=None, help=f"denoising steps (default {DEFAULT_STEPS})")
    p.add_argument(
        "--guidance",
        type=finite_float,
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
    p.add_argument(
        "--upsample",
        nargs="?",
        const=0.15,
        default=None,
        type=finite_float,
        metavar="TEMPERATURE",
        help="prompt upsampling on the encoder server (started with --upsampling): the prompts are rewritten "
        "the way FLUX.2 expects (diffusers' caption_upsample_temperature; 0.15 when no value is given, 0 greedy; "
        "with --image, image-to-image mode), sampled with --seed, printed and saved in the PNGs",
    )
    p.add_argument("--num-images-per-prompt", type=at_least_one, default=1)
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu; default cuda if available")
    p.add_argument(
        "--offload",
        choices=OFFLOAD_CHOICES,
        default=None,
        help="plan: memory planner (default on CUDA); leaf_level: diffusers' recipe; none: all on the device",
    )
    p.add_argument(
        "--vram",
        default=None,
        type=vram_size,
        help=f"VRAM budget for everything on the card, e.g. 8GB (at least {fmt_bytes(MIN_VRAM)}); default: free now",
    )
    p.add_argument(
        "--plan-only",
        action="store_true",
        help="print the memory plan and exit: nothing is loaded, and the known models need no network",
    )
    p.add_argument("--cache-dir", type=Path, default=None, help="keep received embeddings here (safetensors)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_pool_args(p, timeout=120.0)


def build_parser() -> argparse.ArgumentParser:
    epilog = exit_code_table()
    parser = _Parser(
        prog="flux2-client",
        description=__doc__,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"flux2-client {__version__}")
    _add_output_args(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser(
        "generate",
        help="generate images from prompts encoded by a server",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_generate_args(gen)
    _add_output_args(gen)
    tiny = sub.add_parser("make-tiny", help="write tiny random FLUX.2-dev- or klein-shaped models (HF layout)")
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--family", choices=("flux2", "klein"), default="flux2", help="FLUX.2-dev or FLUX.2 [klein]")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--overwrite", action="store_true")
    _add_output_args(tiny)
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
    demo.add_argument(
        "--family",
        choices=("flux2", "klein"),
        default="flux2",
        help="the tiny models to build: FLUX.2-dev (Mistral encoder) or FLUX.2 [klein] (Qwen3 encoder, distilled "
        "DiT); with --model the model's own family",
    )
    demo.add_argument("--prompt", default="a watercolor fox reading a newspaper in a cafe")
    _add_output_args(demo)
    from .bulk import add_encode_parser

    _add_output_args(add_encode_parser(sub))
    return parser


# -- checks before anything is loaded or contacted --------------------------------------------------------
def check_generate_args(args: argparse.Namespace) -> None:
    """Reject bad values before any model is loaded, naming the argument."""
    for name in ("height", "width"):
        value = getattr(args, name)
        if value < 16 or value % 16:
            raise UsageError(f"--{name} must be a positive multiple of 16, got {value}")
    if args.turbo:
        if args.steps is not None and args.steps != TURBO_STEPS:
            raise UsageError(f"--steps: --turbo runs the {TURBO_STEPS} steps of its sigmas, got {args.steps}")
        args.steps = TURBO_STEPS
    args.steps = DEFAULT_STEPS if args.steps is None else args.steps
    args.guidance = (TURBO_GUIDANCE if args.turbo else DEFAULT_GUIDANCE) if args.guidance is None else args.guidance
    if getattr(args, "upsample", None) is not None and args.upsample < 0:
        raise UsageError(f"--upsample: the temperature must be 0 (greedy) or more, got {args.upsample:g}")
    try:
        args.lora = [spec if isinstance(spec, LoraSpec) else LoraSpec.parse(spec) for spec in args.lora]
    except ValueError as exc:
        raise UsageError(f"--{exc}") from None
    if len(args.image) > MAX_REFERENCE_IMAGES:
        raise UsageError(f"--image: at most {MAX_REFERENCE_IMAGES} reference images, got {len(args.image)}")
    for path in args.image:
        if not path.is_file():
            raise UsageError(f"--image: no such file {path}")
    if args.cache_dir is not None:
        if args.cache_dir.exists() and not args.cache_dir.is_dir():
            raise UsageError(f"--cache-dir: {args.cache_dir} is a file, not a folder")
        try:
            args.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--cache-dir: cannot create {args.cache_dir}: {exc.strerror or exc}") from None
        if not os.access(args.cache_dir, os.W_OK | os.X_OK):
            raise UsageError(f"--cache-dir: {args.cache_dir} is not writable")
    args.dit_flag = "--dit" if args.dit is not None else "--model"
    if args.dit is None:
        from .families import default_dit

        args.dit = default_dit(args.model)
        if args.dit_revision is None and args.dit == args.model:
            args.dit_revision = args.revision
    if args.turbo:
        from .families import detect_family

        if detect_family(args.model, args.revision, dit=args.dit, dit_revision=args.dit_revision).is_klein:
            raise UsageError(f"--turbo: the {TURBO_REPO} LoRA is for FLUX.2-dev, not FLUX.2 [klein]")
    if args.plan_only:
        return
    if not args.prompt:
        raise UsageError("--prompt is required (repeat it for several prompts)")
    if any(not p.strip() for p in args.prompt):
        raise UsageError("--prompt must not be empty")
    if not args.server:
        raise UsageError("--server is required (repeat it for several servers)")


def _reference_images(paths: Sequence[Path]) -> list[Any]:
    from ._images import ReferenceImageError, load_reference_images

    try:
        return load_reference_images(paths)
    except ReferenceImageError as exc:
        raise UsageError(f"--image: {exc}") from None


def _workload(args: argparse.Namespace, image_sizes: list[tuple[int, int]]) -> Workload:
    batch = max(1, len(args.prompt)) * args.num_images_per_prompt
    return Workload(args.height, args.width, tuple(image_sizes), batch)


# -- generate --plan-only -----------------------------------------------------------------------------------
def dit_shapes(dit: str, revision: str | None, flag: str = "--dit") -> tuple[dict[str, Any], bool, str]:
    """(transformer config, double quantization, where the shapes came from) for the planner: the built-in
    table for known hub repos (no network), else the folder's or repo's transformer/config.json."""
    from ._known_dits import known_dit
    from ._model_sources import ModelSourceError, check_source, read_json

    known = known_dit(dit)
    if known is not None:
        return dict(known.config), known.double_quant, f"built-in shapes of {dit} (nothing fetched)"
    local = Path(dit) / "transformer" / "config.json"
    if local.is_file():
        source = str(local)
    else:
        check_source(flag, dit, revision, ())  # a path that does not exist, a file, a revision on a folder
        at = f" at revision {revision}" if revision else ""
        _log.info("fetching transformer/config.json of %s%s from the Hugging Face hub (not a built-in model)", dit, at)
        source = f"transformer/config.json of {dit}{at}, fetched from the Hugging Face hub"
    config = read_json(flag, dit, "transformer/config.json", revision)
    if config is None:
        raise ModelSourceError(f"{flag}: {dit} has no transformer/config.json")
    quantization = config.get("quantization_config") or {}
    return config, bool(quantization.get("bnb_4bit_use_double_quant", False)), source


def run_plan_only(args: argparse.Namespace) -> str:
    """The plan from the DiT's shapes alone: nothing is loaded; the known models need no network."""
    from .planner import Budget, plan_memory, spec_from_config

    config, double_quant, source = dit_shapes(args.dit, args.dit_revision, args.dit_flag)
    if args.vram is not None:
        vram = parse_size(args.vram)
    else:
        try:
            import torch
        except ImportError as exc:
            raise CliError(f"--vram is needed without torch ({exc})", ExitCode.USAGE) from None
        if not torch.cuda.is_available():
            raise UsageError("--vram is needed without a CUDA device (there is no free memory to read)")
        from ._allocator import auto_vram_bytes

        vram = auto_vram_bytes(torch.device("cuda", torch.cuda.current_device()))
    from ._allocator import host_available_bytes

    sizes = [im.size for im in _reference_images(args.image)]
    spec = spec_from_config(config, double_quant=double_quant, vae_bytes=170 << 20)
    from .generation import describe_recipe
    from .lora import LoraSourceError, lora_file_adapter_bytes, resolve_loras

    try:
        loras = resolve_loras(_lora_specs(args))
    except LoraSourceError as exc:
        raise UsageError(f"--{exc}") from None
    if loras:  # the adapters stay resident: counted from the files' headers
        counts = [lora_file_adapter_bytes(lora.file) for lora in loras]
        adapter_bytes, widest = sum(n for n, _ in counts), max(w for _, w in counts)
        spec = dataclasses.replace(spec, adapter_bytes=adapter_bytes, adapter_out_features=widest)
    plan = plan_memory(spec, _workload(args, sizes), Budget(vram=vram, host_available=host_available_bytes()))
    text = f"DiT shapes: {source}\n{plan.describe()}"
    recipe = describe_recipe(loras, _params(args), args.turbo)
    if recipe:
        text += "\n" + recipe
    print(text, flush=True)
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


# -- generate -----------------------------------------------------------------------------------------------
def run_generate(args: argparse.Namespace) -> list[Path]:
    check_generate_args(args)
    if args.plan_only:
        run_plan_only(args)
        return []
    _reference_images(args.image)  # a corrupt image fails now, before the server or a model is asked
    from ._model_sources import check_model_sources

    check_model_sources(
        args.model, args.dit, revision=args.revision, dit_revision=args.dit_revision, dit_flag=args.dit_flag
    )
    # The allocator reads this once, when CUDA starts: set it before anything touches the GPU.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from .cache import EmbeddingCache
    from .generation import generate_to_files
    from .lora import LoraKeyError, LoraSourceError
    from .step_cache import StepCacheUnsupported

    cache = EmbeddingCache(args.cache_dir) if args.cache_dir else None
    with pool_from_args(args, cache=cache) as pool:
        try:
            return generate_to_files(
                pool,
                args.prompt,
                args.out,
                _params(args),
                model=args.model,
                dit=args.dit,
                images=args.image,
                num_images_per_prompt=args.num_images_per_prompt,
                device=args.device,
                offload=args.offload,
                vram=args.vram,
                progress=_progress_bars(args),
                verbose=True,
                negative_prompt=args.negative_prompt,
                revision=args.revision,
                dit_revision=args.dit_revision,
                loras=args.lora,
                turbo=args.turbo,
                upsample_temperature=args.upsample,
            )
        except (LoraSourceError, LoraKeyError) as exc:
            raise UsageError(f"--{exc}") from None
        except StepCacheUnsupported as exc:
            raise UsageError(f"--cache: {exc}") from None


def _progress_bars(args: argparse.Namespace) -> bool:
    """Progress bars draw on a terminal for a person: not with --no-progress, --quiet or JSON logs."""
    return not (getattr(args, "no_progress", False) or args.quiet or args.log_format == "json")


def _run(args: argparse.Namespace) -> int:
    from ._logging import library_logging_routed, no_checkpoint_writing_bars

    if args.command == "generate":
        with library_logging_routed(model_libraries=not args.plan_only):
            run_generate(args)
        return 0
    if args.command == "encode":
        from .bulk import run_encode

        args.no_progress = not _progress_bars(args)
        with library_logging_routed(model_libraries=False):
            return run_encode(args)
    if args.command == "make-tiny":
        with library_logging_routed(), no_checkpoint_writing_bars(not args.verbose):
            if args.family == "klein":
                from .tiny_klein import make_tiny_klein

                klein = make_tiny_klein(args.out_dir, seed=args.seed, overwrite=args.overwrite)
                print(f"distilled: {klein.distilled}\nbase:      {klein.base}\nNF4 DiT:   {klein.nf4_repo}")
            else:
                from .tiny import make_tiny_flux2

                paths = make_tiny_flux2(args.out_dir, seed=args.seed, overwrite=args.overwrite)
                print(f"pipeline: {paths.pipeline}\nNF4 DiT:  {paths.nf4_repo}")
        return 0
    if args.command == "demo":
        from .demo import run_demo

        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts
        from .planner import PlanError

        if args.vram is not None:
            try:
                parse_size(args.vram)
            except ValueError as exc:
                raise UsageError(f"--vram: {exc}") from None
        if args.model is not None and args.family != "flux2":
            raise UsageError("--family picks the tiny models; with --model the model's own model_index.json decides")
        if args.model is not None:
            import torch

            if not torch.cuda.is_available():
                raise UsageError("--model: real weights need a CUDA GPU; without --model the demo runs tiny models")
        with library_logging_routed(), no_checkpoint_writing_bars(not args.verbose):
            try:
                run_demo(
                    args.workdir,
                    model=args.model,
                    prompt=args.prompt,
                    dit=args.dit,
                    encoder_precision=args.encoder_precision,
                    vram=args.vram,
                    family=args.family,
                )
            except PlanError as exc:
                raise UsageError(f"--vram: {exc}") from None
        return 0
    raise UsageError(f"unknown command {args.command!r}")


def _report(failure: CliError, exc: BaseException, args: argparse.Namespace) -> None:
    """The failure as one line on stderr (one JSON object with --log-format json); --verbose first adds the
    traceback."""
    if args.log_format == "json":
        fields = {"exit_code": int(failure.code), "error": type(exc).__name__}
        _log.error(failure.message, exc_info=exc if args.verbose else None, extra={"fields": fields})
        return
    if args.verbose and not isinstance(exc, CliError | KeyboardInterrupt):
        traceback.print_exception(exc, file=sys.stderr)
    print(f"flux2-client: error: {failure.message}", file=sys.stderr, flush=True)


def _failure_context(args: argparse.Namespace) -> FailureContext:
    return FailureContext(
        servers=servers_of(getattr(args, "server", None)),
        models=tuple(m for m in (getattr(args, "model", None), getattr(args, "dit", None)) if m),
        tls=bool(getattr(args, "tls", False) or getattr(args, "root_certs", None)),
        mutual_tls=getattr(args, "client_cert", None) is not None,
        timeout=getattr(args, "timeout", None),
        resumable=args.command == "encode",
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(join_signed_values(argv))
    args.verbose = getattr(args, "verbose", False)
    args.quiet = getattr(args, "quiet", False)
    if args.verbose and args.quiet:
        print("flux2-client: error: --verbose and --quiet exclude each other", file=sys.stderr)
        return ExitCode.USAGE
    if not args.verbose:
        # gRPC's C core logs handshake and connection details on stderr at INFO before Python sees the
        # error the CLI reports in one line; read when gRPC starts, so set before it is imported.
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from ._logging import cli_logging

    with cli_logging(args.log_format, verbose=args.verbose, quiet=args.quiet):
        try:
            return _run(args)
        except BrokenPipeError:
            # The reader of stdout stopped (`| head`): nothing left to say. Point stdout at /dev/null so the
            # interpreter's final flush does not fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return ExitCode.OK
        except SystemExit as exc:
            if isinstance(exc.code, str):  # `raise SystemExit("message")` below the CLI: a refused argument
                _report(UsageError(exc.code), exc, args)
                return ExitCode.USAGE
            raise
        except BaseException as exc:  # the CLI's edge: every failure becomes one line and an exit code
            failure = describe_failure(exc, _failure_context(args))
            _report(failure, exc, args)
            return failure.code


if __name__ == "__main__":
    sys.exit(main())
