"""Server settings: one typed object, parsed once at start from CLI flags and environment variables.

Every field is a flag (`--max-batch-prompts 32`) and an environment variable
(`FLUX2_ENCODER_MAX_BATCH_PROMPTS=32`); a flag wins over the environment, the environment over the
default. Nothing else in the server reads the environment.

The models a server hosts come from `--model`, repeatable as `--model NAME=REPO_OR_PATH` (in the
environment: comma-separated, `FLUX2_ENCODER_MODEL=flux2-dev=REPO,klein-4b=REPO`); a single `--model REPO`
serves one model named `default`. `Settings.models` is that list, parsed once here. A model's own settings
(its precision, device, batching, ...; `PER_MODEL_SETTINGS`) can differ from the server's with
`--model-setting NAME.SETTING=VALUE` (`flux2-dev.precision=fp8`); `Settings.for_model` applies them.

Secret settings (bearer tokens) are held as `SecretStr`: `repr(settings)`, `--help`, logs and error
messages show a mask, never the value; only `get_secret_value()` gives it, where it is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .security import parse_token_lines

ENV_PREFIX = "FLUX2_ENCODER_"

#: The name of the model a plain `--model REPO_OR_PATH` serves.
DEFAULT_MODEL_NAME = "default"
#: What a served model's name may be: it travels in requests, metric labels and HTTP paths
#: (/models/{name}/predict).
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve: the name requests use and the hub repo id or folder it is loaded from."""

    name: str
    source: str


def parse_model_specs(raw: str) -> tuple[ModelSpec, ...]:
    """`--model` as given: `REPO_OR_PATH` (one model named `default`) or comma-separated `NAME=REPO_OR_PATH`
    entries (one model each, every one named). Raises ValueError naming the bad entry."""
    entries = [entry.strip() for entry in raw.split(",")]
    if len(entries) == 1 and "=" not in entries[0]:
        if not entries[0]:
            raise ValueError("--model: a hub repo id or a folder is required")
        return (ModelSpec(DEFAULT_MODEL_NAME, entries[0]),)
    specs: list[ModelSpec] = []
    for i, entry in enumerate(entries, 1):
        name, sep, source = entry.partition("=")
        name, source = name.strip(), source.strip()
        if not sep:
            raise ValueError(
                f"--model entry {i} ({entry!r}): name every model when serving several (NAME=REPO_OR_PATH)"
            )
        if not MODEL_NAME.fullmatch(name):
            raise ValueError(
                f"--model entry {i}: model name {name[:64]!r} must be 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        if not source:
            raise ValueError(f"--model entry {i} ({name}): a hub repo id or a folder is required after '='")
        if any(spec.name == name for spec in specs):
            raise ValueError(f"--model entry {i}: the name {name!r} is given twice")
        specs.append(ModelSpec(name, source))
    return tuple(specs)


#: The settings a model may have of its own (`--model-setting NAME.SETTING=VALUE`): what its engine is loaded
#: with and what its own queue and batches follow. The rest (ports, limits of a request, auth, cache, the
#: in-flight bytes) is the server's.
PER_MODEL_SETTINGS = (
    "revision",
    "text_encoder_subfolder",
    "tokenizer_subfolder",
    "device",
    "precision",
    "batching_mode",
    "compile",
    "cuda_graphs",
    "max_batch_prompts",
    "max_wait_ms",
    "pipeline_depth",
    "launch_lead_ms",
    "balance_batches",
    "max_queued_requests",
)


def parse_model_settings(entries: str) -> dict[str, dict[str, str]]:
    """`--model-setting` as given (comma-separated `NAME.SETTING=VALUE`): {model name: {setting: raw value}}.
    Raises ValueError naming the bad entry. Values are converted and checked by `Settings`."""
    out: dict[str, dict[str, str]] = {}
    for i, entry in enumerate((e.strip() for e in entries.split(",") if e.strip()), 1):
        target, sep, value = entry.partition("=")
        name, dot, setting = target.strip().rpartition(".")
        setting = setting.strip().replace("-", "_")
        if not sep or not dot or not name:
            raise ValueError(f"--model-setting entry {i} ({entry[:80]!r}): expected NAME.SETTING=VALUE")
        if setting not in PER_MODEL_SETTINGS:
            allowed = ", ".join(n.replace("_", "-") for n in PER_MODEL_SETTINGS)
            shown = setting.replace("_", "-")
            raise ValueError(f"--model-setting entry {i}: {shown!r} is not a per-model setting (one of: {allowed})")
        per_model = out.setdefault(name.strip(), {})
        if setting in per_model:
            raise ValueError(f"--model-setting entry {i}: {name.strip()}.{setting.replace('_', '-')} is given twice")
        per_model[setting] = value.strip()
    return out


class SecretStr:
    """A string that does not print itself: str(), repr() and format() give a mask."""

    __slots__ = ("_value",)
    _MASK = "**********"

    def __init__(self, value: str):
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"SecretStr({self._MASK!r})" if self._value else "SecretStr('')"

    def __str__(self) -> str:
        return self._MASK if self._value else ""

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecretStr):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> Any:  # pickling would write the value in clear; nothing needs it
        raise TypeError("SecretStr is not picklable")


def _setting(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


def _secret_setting(help: str) -> Any:
    return field(default=None, metadata={"help": help, "secret": True})


@dataclass(frozen=True)
class Settings:
    model: str = _setting(
        "black-forest-labs/FLUX.2-dev",
        "hub repo id or local folder holding text_encoder/ and tokenizer/ (served as the model named 'default'); "
        "repeat as --model NAME=REPO_OR_PATH to host several models on one server, each with its own queue and "
        "batches (comma-separated in the environment variable)",
        repeatable=True,
    )
    default_model: str | None = _setting(
        None, "name of the model that requests naming none get (and HTTP /predict serves); default: the first --model"
    )
    model_setting: str = _setting(
        "",
        "a setting of one model that differs from the server's, as NAME.SETTING=VALUE (e.g. flux2-dev.precision=fp8, "
        "klein-4b.max-batch-prompts=32; NAME default for a plain --model); repeat it (comma-separated in the "
        "environment variable). Per-model settings: " + ", ".join(n.replace("_", "-") for n in PER_MODEL_SETTINGS),
        repeatable=True,
    )
    revision: str | None = _setting(
        None, "hub revision (branch, tag or commit) of --model (one model; several: --model-setting NAME.revision=)"
    )
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
    cuda_graphs: bool = _setting(
        False,
        "capture the forward as CUDA graphs, one per batch size 2, 4, 8, 16, 24, ... up to --max-batch-prompts "
        "(a batch runs padded up to the next one): one launch per batch instead of ~600, so streaming responses "
        "cannot starve the GPU of kernels; costs start-up time and one batch of GPU memory (CUDA only)",
    )
    host: str = _setting("0.0.0.0", "address the gRPC server binds")
    port: int = _setting(50051, "gRPC port (0 picks a free one, printed at start)")
    http_port: int | None = _setting(
        None,
        "port of the HTTP compatibility front-end (POST /predict, GET /health, GET /info) on --host; "
        "unset or 'off' disables it, 0 picks a free one (printed at start)",
    )
    http_max_body_bytes: int = _setting(
        4 << 20, "largest HTTP request body accepted; larger ones get 413 before they are read"
    )
    http_read_timeout_s: float = _setting(
        30.0,
        "an HTTP request's headers must arrive within this many seconds of the connection opening (or of the "
        "first byte of the next request on a kept-alive connection), and its body within this many seconds "
        "of its headers, or it gets 408 and the connection is closed: slow or stalled clients cannot hold a "
        "connection or a request slot",
    )
    http_max_concurrent_requests: int = _setting(
        256,
        "HTTP requests being read, encoded or sent at once; beyond it 503 with Retry-After (a cap on what "
        "half-sent or never-read requests can hold)",
    )
    # -- batching ---------------------------------------------------------------------------------------
    max_batch_prompts: int = _setting(
        16,
        "most prompts run in one model batch; every prompt is padded to max_length (512) tokens, so the "
        "token budget of a batch is max_batch_prompts * 512",
    )
    max_wait_ms: float = _setting(5.0, "how long the batcher waits to fill a batch once a request is queued")
    pipeline_depth: int = _setting(
        2,
        "model batches launched on the device and not yet answered: at 2 the next batch is formed and launched "
        "while one runs, so the GPU does not idle between batches; 1 runs one batch at a time",
    )
    launch_lead_ms: float = _setting(
        50.0,
        "while launched batches still hold the device, the next batch keeps filling until the device is "
        "expected to finish them within this many ms, then goes (bigger batches, the device never idle); "
        "0 launches it once --max-wait-ms has passed",
    )
    balance_batches: bool = _setting(
        True,
        "while batches are launched, cap the next at 1/pipeline-depth of the prompts queued and launched, so a "
        "closed loop of clients settles into equal batches instead of a big and a small group (Klein 4B encoder "
        "at 32 clients on an H200: 107-123 completions/s with it, 85-86 without)",
    )
    # -- limits and backpressure (a full limit answers RESOURCE_EXHAUSTED at once) ---------------------
    max_prompts_per_request: int = _setting(64, "most prompts one Encode request may carry")
    max_prompt_chars: int = _setting(20000, "most characters in one prompt (longer prompts are refused)")
    max_queued_requests: int = _setting(256, "requests waiting for the model before new ones get RESOURCE_EXHAUSTED")
    max_inflight_bytes: int = _setting(
        4 << 30,
        "response bytes (prompts * 512 * embedding_dim * 2) reserved by admitted requests, from admission "
        "until the last chunk is sent; a request that would go past it gets RESOURCE_EXHAUSTED",
    )
    default_timeout_s: float = _setting(
        300.0, "deadline for requests that carry none (a client's own gRPC deadline always applies)"
    )
    send_timeout_s: float = _setting(
        120.0,
        "an answer must be sent (first to last byte) within this many seconds, or its stream / HTTP response "
        "is cancelled and its reservation freed (counted as dropped, reason send_timeout): a client that "
        "stops reading cannot hold --max-inflight-bytes",
    )
    chunk_bytes: int = _setting(1 << 20, "payload bytes per streamed chunk (must stay under the client's 4 MiB limit)")
    frontends: int = _setting(
        0,
        "front-end processes serving gRPC and HTTP (same ports, SO_REUSEPORT) while this process keeps the models, "
        "so that streaming answers never competes with the model thread for the GIL; answers travel through a "
        "shared memory ring of max_inflight_bytes; 0: one process does everything",
    )
    gil_switch_interval_ms: float = _setting(
        1.0,
        "Python's thread switch interval (sys.setswitchinterval) set by `serve` for the server process: the "
        "model thread and the response streaming share one GIL, and a shorter interval lets the model thread "
        "launch its next GPU kernels sooner (Python's default is 5 ms); 0 leaves the interpreter's value",
    )
    # -- prompt upsampling (the Upsample rpc, POST /upsample, Encode's upsample option) ---------------------
    upsampling: bool = _setting(
        False,
        "load the whole text encoder (all decoder layers, the output head, the vision tower: ~48 GB in bf16 for "
        "FLUX.2-dev instead of ~32 GB) to also rewrite prompts the way FLUX.2 expects, as diffusers' "
        "upsample_prompt does; encoding reads the same layers and gives the same bytes. Needs --precision bf16 "
        "and no --compile; image-to-image mode needs torchvision",
    )
    upsample_share: float = _setting(
        0.25,
        "while prompts and upsampling requests both wait, the fraction of the model thread's time that goes to "
        "upsampling (of the turns, and inside a generation, which lets queued encode batches run between "
        "tokens), so neither starves the other",
    )
    upsample_max_queued_requests: int = _setting(
        16, "upsampling requests waiting for the model before new ones get RESOURCE_EXHAUSTED"
    )
    upsample_max_prompts: int = _setting(8, "most prompts in one upsampling request (each is padded to 2048 tokens)")
    upsample_max_new_tokens: int = _setting(512, "most tokens generated per prompt (diffusers generates up to 512)")
    upsample_max_temperature: float = _setting(2.0, "highest sampling temperature accepted (0 is greedy decoding)")
    upsample_max_images: int = _setting(10, "most reference images in one upsampling request")
    upsample_max_image_bytes: int = _setting(8 << 20, "largest reference image file (PNG, JPEG or WebP), in bytes")
    upsample_max_image_pixels: int = _setting(
        25_000_000,
        "most pixels of one reference image, read from its header before decoding (images over 768x768 are "
        "then scaled down to that area, as diffusers does)",
    )
    # -- security -----------------------------------------------------------------------------------------
    auth_tokens_file: str | None = _setting(
        None,
        "file of bearer tokens, one `label:token` per line (# comments allowed); with no token from here "
        "or --auth-tokens, authentication is OFF (a warning is logged)",
    )
    auth_tokens: SecretStr | None = _secret_setting(  # noqa: RUF009 (a dataclasses.field, default None)
        "comma-separated `label:token` pairs; prefer the environment variable FLUX2_ENCODER_AUTH_TOKENS "
        "(or the file) over this flag, which other users can see in the process list",
    )
    rate_limit_prompts_per_s: float = _setting(
        0.0, "per token: sustained prompts per second (token bucket); 0 turns the rate limit off"
    )
    rate_limit_burst_prompts: int = _setting(
        128, "per token: prompts a token may send at once before the rate limit applies (bucket size)"
    )
    max_concurrent_requests_per_token: int = _setting(
        0, "per token: requests in flight at once (queued, encoding or sending); 0 means no limit"
    )
    tls_cert: str | None = _setting(None, "PEM certificate chain of the server; with --tls-key turns TLS on")
    tls_key: str | None = _setting(None, "PEM private key of the server")
    tls_client_ca: str | None = _setting(
        None, "PEM CA bundle; when set, clients must present a certificate signed by it (mutual TLS)"
    )
    reflection: bool = _setting(
        True, "serve gRPC reflection (schema only; needs a bearer token like every rpc except health)"
    )
    # -- embedding cache -----------------------------------------------------------------------------------
    cache_bytes: int = _setting(
        1 << 30, "in-memory LRU cache of embeddings, in bytes (one FLUX.2-dev prompt is 15.7 MB); 0 turns it off"
    )
    cache_dir: str | None = _setting(
        None, "folder for an on-disk embedding cache (safetensors files, no pickle); off when unset"
    )
    cache_dir_bytes: int = _setting(16 << 30, "size bound of the on-disk cache; the least recently used go first")
    # -- operations --------------------------------------------------------------------------------------------
    metrics_port: int | None = _setting(
        None, "HTTP port for Prometheus metrics at /metrics (0 picks a free one, printed at start); off when unset"
    )
    metrics_host: str = _setting("0.0.0.0", "address the metrics HTTP server binds")
    grace_period_s: float = _setting(30.0, "on SIGTERM, how long in-flight requests may take to finish")
    warmup: bool = _setting(True, "run one encode before reporting SERVING")
    unhealthy_after_failed_batches: int = _setting(
        3, "this many model batches failing in a row turn health NOT_SERVING until a self-test encode passes"
    )
    self_test_interval_s: float = _setting(
        60.0, "how often the server encodes a fixed prompt to check the model while idle (0: only after failures)"
    )
    log_level: str = _setting("INFO", "logging level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    log_format: str = _setting(
        "auto",
        "json: one JSON object per line (one per request, with stage timings); text: for humans; auto: text "
        "on a terminal, json otherwise",
        choices=("auto", "json", "text"),
    )

    #: Set by `for_model` on the settings of one model of several (server-wide flags such as --upsampling
    #: then apply to the models that can take them); not a setting.
    hosted_beside_others: ClassVar[bool] = False

    def __post_init__(self) -> None:
        # Normalised once, here: code that builds Settings directly may pass a secret as a plain str.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret") and isinstance(value, str):
                object.__setattr__(self, f.name, SecretStr(value))
        # The hosted models, parsed once (a bad --model is reported by problems(), and by `models`).
        try:
            specs: tuple[ModelSpec, ...] | str = parse_model_specs(self.model)
        except ValueError as exc:
            specs = str(exc)
        object.__setattr__(self, "_model_specs", specs)
        try:
            overrides: dict[str, dict[str, Any]] | str = self._converted_model_settings()
        except ValueError as exc:
            overrides = str(exc)
        object.__setattr__(self, "_model_overrides", overrides)

    def _converted_model_settings(self) -> dict[str, dict[str, Any]]:
        fields = {f.name: f for f in dataclasses.fields(self)}
        out: dict[str, dict[str, Any]] = {}
        for name, raw in parse_model_settings(self.model_setting).items():
            for setting, value in raw.items():
                f = fields[setting]
                flag = f"--model-setting {name}.{setting.replace('_', '-')}"
                try:
                    converted = _converter(f)(value)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"{flag}={value[:40]!r}: {exc}") from None
                choices = f.metadata.get("choices")
                if choices and converted not in choices:
                    raise ValueError(f"{flag}={value[:40]!r}: must be one of {', '.join(choices)}")
                out.setdefault(name, {})[setting] = converted
        return out

    @property
    def models(self) -> tuple[ModelSpec, ...]:
        """Every model to serve, the default first, then the others in the order given."""
        specs = self._model_specs  # type: ignore[attr-defined]
        if isinstance(specs, str):
            raise ValueError(specs)
        default = self.default_model_name
        return tuple(sorted(specs, key=lambda spec: spec.name != default))

    @property
    def default_model_name(self) -> str:
        """The model requests that name none get: --default-model, else the first --model."""
        specs = self._model_specs  # type: ignore[attr-defined]
        if self.default_model:
            return self.default_model
        return specs[0].name if not isinstance(specs, str) else DEFAULT_MODEL_NAME

    def for_model(self, spec: ModelSpec) -> Settings:
        """These settings with `spec` as the only model: what the engine factory loads it with (the settings
        themselves when they name that one model only and give it no --model-setting of its own).
        `hosted_beside_others` says the server hosts more."""
        if self.model == spec.source and not self.model_setting:
            return self  # the single-model server's path, and where a running server reads --model-setting
        overrides = self._model_overrides  # type: ignore[attr-defined]
        own = overrides.get(spec.name, {}) if isinstance(overrides, dict) else {}
        if self.model == spec.source and not own:
            return self
        one = dataclasses.replace(self, model=spec.source, default_model=None, model_setting="", **own)
        if self.model != spec.source:
            object.__setattr__(one, "hosted_beside_others", True)
        return one

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(
            prog="flux2-encoder-server",
            description="Serve FLUX.2 prompt embeddings over gRPC (and, with --http-port, the HTTP /predict "
            "contract of the hosted FLUX.2 text encoder). Every flag can also be set through the "
            f"environment as {ENV_PREFIX}<FLAG_NAME> (e.g. {ENV_PREFIX}MAX_BATCH_PROMPTS=32).",
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            kwargs: dict[str, Any] = {"help": f.metadata["help"], "default": f.default, "dest": f.name}
            if f.metadata.get("secret"):
                kwargs["metavar"] = "SECRET"
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            if f.type in ("bool", bool):
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = _converter(f)
            if f.metadata.get("repeatable"):
                kwargs["action"] = _Repeated
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
                    shown = "(secret)" if f.metadata.get("secret") else repr(raw)
                    parser.error(f"{ENV_PREFIX}{f.name.upper()}={shown}: {exc}")
        parser.set_defaults(**env_defaults)
        args = parser.parse_args(argv)
        values: dict[str, Any] = {k: ",".join(v) if isinstance(v, list) else v for k, v in vars(args).items()}
        settings = cls(**values)
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
            "max_inflight_bytes",
            "pipeline_depth",
            "unhealthy_after_failed_batches",
            "upsample_max_queued_requests",
            "upsample_max_prompts",
            "upsample_max_new_tokens",
            "upsample_max_image_bytes",
            "upsample_max_image_pixels",
        ):
            if getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("cache_bytes", "cache_dir_bytes", "max_concurrent_requests_per_token", "frontends"):
            if getattr(self, name) < 0:
                out.append(f"--{name.replace('_', '-')} must not be negative")
        if not 1024 <= self.chunk_bytes <= 3 << 20:
            out.append("--chunk-bytes must be between 1 KiB and 3 MiB (gRPC's default receive limit is 4 MiB)")
        if not 0 <= self.gil_switch_interval_ms <= 100:
            out.append("--gil-switch-interval-ms must be between 0 (leave Python's value) and 100")
        if self.max_wait_ms < 0 or self.grace_period_s < 0 or self.rate_limit_prompts_per_s < 0:
            out.append("--max-wait-ms, --grace-period-s and --rate-limit-prompts-per-s must not be negative")
        if self.launch_lead_ms < 0:
            out.append("--launch-lead-ms must not be negative")
        if self.self_test_interval_s < 0:
            out.append("--self-test-interval-s must not be negative")
        for name in ("default_timeout_s", "send_timeout_s", "http_read_timeout_s"):
            if getattr(self, name) <= 0:
                out.append(f"--{name.replace('_', '-')} must be positive")
        if not 0 < self.upsample_share <= 1:
            out.append("--upsample-share must be above 0 and at most 1")
        if self.upsample_max_images < 0 or not 0 <= self.upsample_max_temperature <= 100:
            out.append("--upsample-max-images must not be negative; --upsample-max-temperature must be 0 to 100")
        if self.http_max_concurrent_requests < 1:
            out.append("--http-max-concurrent-requests must be at least 1")
        if self.rate_limit_prompts_per_s > 0 and self.rate_limit_burst_prompts < self.max_prompts_per_request:
            out.append(
                "--rate-limit-burst-prompts must be at least --max-prompts-per-request, or the largest "
                "allowed request could never pass the rate limit"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            out.append("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            out.append("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        for name in ("metrics_port", "port", "http_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                out.append(f"--{name.replace('_', '-')} must be a port number (0 picks a free one)")
        if self.http_max_body_bytes < 1024:
            out.append("--http-max-body-bytes must be at least 1 KiB")
        out.extend(self._token_problems())
        out.extend(self._model_problems())
        return out

    def _model_problems(self) -> list[str]:
        try:
            specs = self.models
        except ValueError as exc:
            return [str(exc)]
        names = [spec.name for spec in specs]
        out = []
        if self.default_model is not None and self.default_model not in names:
            out.append(f"--default-model {self.default_model!r} is not one of the --model names: {', '.join(names)}")
        if self.revision is not None and len(specs) > 1:
            out.append(
                "--revision pins one model; with several --model entries, pin each with "
                "--model-setting NAME.revision=REV (or serve pinned local folders)"
            )
        overrides = self._model_overrides  # type: ignore[attr-defined]
        if isinstance(overrides, str):
            return [*out, overrides]
        for name in overrides:
            if name not in names:
                out.append(f"--model-setting {name}.*: no model is named {name!r} (served: {', '.join(names)})")
        server_wide: set[str] | None = None
        for spec in specs:
            if spec.name in overrides:
                # The model's own settings obey the same rules as the server's (e.g. --max-batch-prompts >= 1);
                # what is wrong with the server's own settings is reported once, by the caller.
                if server_wide is None:
                    server_wide = set(dataclasses.replace(self, model_setting="").problems())
                own = [p for p in self.for_model(spec).problems() if p not in server_wide]
                out.extend(f"{p} (model {spec.name})" for p in own)
        return out

    def _token_problems(self) -> list[str]:
        """Inline bearer tokens that cannot be used, in messages that name the entry and never a token.
        (The tokens file is read when the server starts: it may be mounted only where the server runs.)"""
        if self.auth_tokens is None:
            return []
        try:
            parse_token_lines(self.auth_tokens.get_secret_value().split(","), "--auth-tokens")
        except ValueError as exc:
            return [str(exc)]
        return []


class _Repeated(argparse.Action):
    """A repeatable flag: the values given replace the default (or the environment's value) and are joined
    with commas after parsing, as the environment variable spells several."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        given = getattr(namespace, self.dest)
        setattr(namespace, self.dest, [*(given if isinstance(given, list) else []), values])


def _converter(f: dataclasses.Field) -> Any:
    if f.metadata.get("secret"):
        return lambda raw: SecretStr(raw) if raw else None
    kind = str(f.type)
    if kind in ("bool", "<class 'bool'>"):
        return _parse_bool
    if kind.startswith("int | None"):
        return _parse_optional_int
    if kind.startswith("int"):
        return int
    if kind.startswith("float"):
        return float
    if kind.startswith("str | None"):
        return lambda raw: raw or None
    return str


def _parse_optional_int(raw: str) -> int | None:
    """'' / 'none' / 'off' mean unset; anything else must be an integer."""
    if raw.strip().lower() in ("", "none", "off"):
        return None
    return int(raw)


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true/false")
