"""Server settings: one typed object, parsed once at start from CLI flags and environment variables.

Every field is a flag (`--max-batch-prompts 32`) and an environment variable
(`FLUX2_ENCODER_MAX_BATCH_PROMPTS=32`); a flag wins over the environment, the environment over the
default. Nothing else in the server reads the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "FLUX2_ENCODER_"


def _setting(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class Settings:
    model: str = _setting(
        "black-forest-labs/FLUX.2-dev",
        "hub repo id or local folder holding text_encoder/ and tokenizer/",
    )
    revision: str | None = _setting(None, "hub revision (branch, tag or commit) of --model")
    text_encoder_subfolder: str = _setting("text_encoder", "subfolder of --model with the encoder weights")
    tokenizer_subfolder: str = _setting("tokenizer", "subfolder of --model with the tokenizer")
    device: str | None = _setting(None, "torch device for the encoder; default cuda if available, else cpu")
    dtype: str = _setting("bfloat16", "encoder dtype, also the dtype sent on the wire", choices=("bfloat16",))
    precision: str = _setting(
        "bf16",
        "encoder weight precision: bf16 (bit-identical to diffusers), fp8 (H100-class GPUs), int8 or nf4 "
        "(bitsandbytes); docs/benchmarks.md has memory, speed and fidelity of each",
        choices=("bf16", "fp8", "int8", "nf4"),
    )
    batching_mode: str = _setting(
        "reproducible",
        "reproducible: a prompt's bytes do not depend on the load (a lone prompt runs padded to a batch of "
        "two); dynamic: batches run as formed (a lone prompt's bytes can differ on GPUs)",
        choices=("reproducible", "dynamic"),
    )
    compile: bool = _setting(False, "torch.compile the decoder layers (faster on GPUs; not bit-identical to eager)")
    host: str = _setting("0.0.0.0", "address the gRPC server binds")
    port: int = _setting(50051, "gRPC port (0 picks a free one, printed at start)")
    max_batch_prompts: int = _setting(16, "most prompts run in one model batch (the token budget / 512)")
    max_wait_ms: float = _setting(5.0, "how long the batcher waits to fill a batch once a request is queued")
    max_prompts_per_request: int = _setting(64, "most prompts one Encode request may carry")
    max_prompt_chars: int = _setting(20000, "most characters in one prompt (longer prompts are refused)")
    max_queued_requests: int = _setting(256, "requests waiting for the model before new ones get RESOURCE_EXHAUSTED")
    chunk_bytes: int = _setting(1 << 20, "payload bytes per streamed chunk (must stay under the client's 4 MiB limit)")
    grace_period_s: float = _setting(30.0, "on SIGTERM, how long in-flight requests may take to finish")
    warmup: bool = _setting(True, "run one encode before reporting SERVING")
    log_level: str = _setting("INFO", "logging level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(
            prog="flux2-encoder-server",
            description="Serve FLUX.2 prompt embeddings over gRPC. Every flag can also be set through the "
            f"environment as {ENV_PREFIX}<FLAG_NAME> (e.g. {ENV_PREFIX}MAX_BATCH_PROMPTS=32).",
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            kwargs: dict[str, Any] = {"help": f.metadata["help"], "default": f.default, "dest": f.name}
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            if f.type in ("bool", bool):
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = _converter(f)
            parser.add_argument(flag, **kwargs)
        return parser

    @classmethod
    def from_cli(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        parser = cls.parser()
        env_defaults: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = (environ or {}).get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                try:
                    env_defaults[f.name] = _converter(f)(raw)
                except (TypeError, ValueError) as exc:
                    parser.error(f"{ENV_PREFIX}{f.name.upper()}={raw!r}: {exc}")
        parser.set_defaults(**env_defaults)
        args = parser.parse_args(argv)
        settings = cls(**vars(args))
        problems = settings.problems()
        if problems:
            parser.error("; ".join(problems))
        return settings

    def problems(self) -> list[str]:
        out = []
        for name in (
            "max_batch_prompts",
            "max_prompts_per_request",
            "max_prompt_chars",
            "max_queued_requests",
        ):
            if getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')} must be at least 1")
        if not 1024 <= self.chunk_bytes <= 3 << 20:
            out.append("--chunk-bytes must be between 1 KiB and 3 MiB (gRPC's default receive limit is 4 MiB)")
        if self.max_wait_ms < 0 or self.grace_period_s < 0:
            out.append("--max-wait-ms and --grace-period-s must not be negative")
        return out


def _converter(f: dataclasses.Field) -> Any:
    kind = str(f.type)
    if kind in ("bool", "<class 'bool'>"):
        return _parse_bool
    if kind.startswith("int"):
        return int
    if kind.startswith("float"):
        return float
    if kind.startswith("str | None"):
        return lambda raw: raw or None
    return str


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true/false")
