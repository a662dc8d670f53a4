"""How `flux2-client` reports a failure: one line on stderr with the cause and what to do, and an exit
code per class of failure.

Library code raises its own exceptions (`RemoteEncoderError`, `PlanError`, huggingface_hub's errors, ...);
`describe_failure` is the CLI's one mapping table from those to a `CliError` (message + `ExitCode`), the
way a server maps errors to status codes only at its edge. Pure Python: the CLI must be able to report a
bad argument without importing torch, so exception classes of heavy modules are only looked at when
their module is already loaded (an exception of a module never imported cannot have been raised).
"""

from __future__ import annotations

import enum
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class ExitCode(enum.IntEnum):
    OK = 0
    UNEXPECTED = 1
    USAGE = 2
    MODEL = 3
    UNREACHABLE = 4
    AUTH = 5
    MODEL_MISMATCH = 6
    SERVER = 7
    MEMORY = 8
    ENVIRONMENT = 9
    INTERRUPTED = 130


#: What each exit code means: printed by `flux2-client --help` and kept in the README (a test checks both).
EXIT_CODES: tuple[tuple[ExitCode, str], ...] = (
    (ExitCode.OK, "success"),
    (ExitCode.UNEXPECTED, "unexpected error (a bug): rerun with --verbose and report the traceback"),
    (
        ExitCode.USAGE,
        "bad command line: an invalid value, or a file named on it that cannot be used (--image, --cache-dir, "
        "the caption file, certificates)",
    ),
    (
        ExitCode.MODEL,
        "model files: --model/--dit not found, gated or not logged in, unknown --revision, not cached while "
        "offline, or a file missing",
    ),
    (
        ExitCode.UNREACHABLE,
        "no encoder server answered: down, wrong --server, TLS on one side only, no answer within --timeout, "
        "or it went away mid-run",
    ),
    (ExitCode.AUTH, "the encoder server refused the credentials (--token, client certificate)"),
    (
        ExitCode.MODEL_MISMATCH,
        "model mismatch: the server serves another model than --expect-fingerprint, than the DiT takes, or "
        "than the --out folder holds",
    ),
    (
        ExitCode.SERVER,
        "the encoder server refused or failed the request (bad prompt, still busy after retries, internal "
        "error, corrupt response)",
    ),
    (
        ExitCode.MEMORY,
        "out of memory: --vram cannot hold the smallest plan, or the GPU or host ran out (the plan tried is "
        "in the message)",
    ),
    (
        ExitCode.ENVIRONMENT,
        "this machine: a missing dependency, no CUDA device to read free memory from, an output that cannot be written",
    ),
    (ExitCode.INTERRUPTED, "interrupted (Ctrl-C); `encode` keeps what it finished: rerun to resume"),
)


def exit_code_table() -> str:
    """The exit codes as the `--help` epilog shows them."""
    lines = ["exit codes:"]
    for code, text in EXIT_CODES:
        lines += textwrap.wrap(text, 100, initial_indent=f"  {int(code):>3}  ", subsequent_indent=" " * 7)
    return "\n".join(lines)


class CliError(Exception):
    """A failure the CLI reports as one line (`message`) and exits with `code`."""

    def __init__(self, message: str, code: ExitCode = ExitCode.USAGE):
        super().__init__(message)
        self.message = message
        self.code = code


class UsageError(CliError):
    """A bad argument value, found before anything is loaded or contacted."""

    def __init__(self, message: str):
        super().__init__(message, ExitCode.USAGE)


@dataclass(frozen=True)
class FailureContext:
    """What the command was talking to, for messages that say what to do."""

    servers: tuple[str, ...] = ()
    #: The --model and --dit of the command, for hub errors raised while loading (which name no argument).
    models: tuple[str, ...] = ()
    tls: bool = False
    mutual_tls: bool = False
    timeout: float | None = None
    #: The command keeps what it finished and resumes when rerun (`encode`).
    resumable: bool = False


def one_line(text: str, limit: int = 2000) -> str:
    """`text` with every run of whitespace (newlines included) as one space, at most `limit` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _class(module: str, name: str) -> type | None:
    """The exception class `module.name` if that module is already imported."""
    mod = sys.modules.get(module)
    cls = getattr(mod, name, None) if mod is not None else None
    return cls if isinstance(cls, type) else None


def _isinstance(exc: BaseException, module: str, *names: str) -> bool:
    classes = tuple(c for c in (_class(module, n) for n in names) if c is not None)
    return bool(classes) and isinstance(exc, classes)


def _servers(context: FailureContext) -> str:
    if not context.servers:
        return "the encoder server"
    if len(context.servers) == 1:
        return f"the encoder server {context.servers[0]}"
    return f"the encoder servers {', '.join(context.servers)}"


def describe_failure(exc: BaseException, context: FailureContext | None = None) -> CliError:
    """The one-line message and exit code the CLI reports for `exc`."""
    context = context or FailureContext()
    if isinstance(exc, CliError):
        return CliError(one_line(exc.message), exc.code)
    if isinstance(exc, KeyboardInterrupt):
        return CliError("interrupted", ExitCode.INTERRUPTED)
    for describe in (_encoder_failure, _model_failure, _memory_failure):
        found = describe(exc, context)
        if found is not None:
            return CliError(one_line(found.message), found.code)
    if isinstance(exc, ImportError):
        return CliError(
            f"missing dependency {exc.name or exc}: pip install 'flux2-split[client]'", ExitCode.ENVIRONMENT
        )
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return CliError(one_line(f"{exc.strerror or exc}{where}"), ExitCode.ENVIRONMENT)
    return CliError(
        one_line(f"unexpected {type(exc).__name__}: {exc} (rerun with --verbose for the traceback and report it)"),
        ExitCode.UNEXPECTED,
    )


# -- the encoder servers ----------------------------------------------------------------------------------
_UNREACHABLE_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED")
_AUTH_CODES = ("UNAUTHENTICATED", "PERMISSION_DENIED")


def _encoder_failure(exc: BaseException, context: FailureContext) -> CliError | None:
    if _isinstance(exc, "flux2_client.families", "EmbeddingWidthError"):
        return CliError(f"--dit: {exc}", ExitCode.MODEL_MISMATCH)
    if _isinstance(exc, "flux2_client.shards", "ShardFingerprintError"):
        return CliError(str(exc), ExitCode.MODEL_MISMATCH)
    if _isinstance(exc, "flux2split_proto.codec", "WireError"):
        return CliError(f"{_servers(context)} sent a corrupt or oversized response: {exc}", ExitCode.SERVER)
    if _isinstance(exc, "httpx", "TransportError"):
        return CliError(
            f"cannot reach {_servers(context)}: {type(exc).__name__}: {exc or 'no details'}; check that it runs "
            "and the URL is right",
            ExitCode.UNREACHABLE,
        )
    if not _isinstance(exc, "flux2_client.encoder", "RemoteEncoderError"):
        return None
    code_name = getattr(getattr(exc, "code", None), "name", "UNKNOWN")
    detail = one_line(getattr(exc, "message", "") or str(exc), 600)
    http_status = getattr(exc, "http_status", None)
    if _isinstance(exc, "flux2_client.encoder", "FingerprintMismatchError") or code_name == "FAILED_PRECONDITION":
        return CliError(
            f"{_servers(context)} serves another model: {detail}; point --server at a server with the expected "
            "model, or update --expect-fingerprint",
            ExitCode.MODEL_MISMATCH,
        )
    if code_name == "NOT_FOUND":  # the server hosts no model of the name asked for; it lists its own
        return CliError(f"{_servers(context)}: {detail}; pick one with --encoder-model", ExitCode.MODEL_MISMATCH)
    if code_name in _AUTH_CODES or http_status in (401, 403):
        what = "--token (or FLUX2_ENCODER_TOKEN)"
        if context.mutual_tls:
            what += " and --client-cert/--client-key"
        return CliError(
            f"{_servers(context)} refused the credentials ({code_name}: {detail}); check {what}", ExitCode.AUTH
        )
    if code_name in _UNREACHABLE_CODES or http_status in (502, 503, 504):
        return CliError(_unreachable_message(code_name, detail, context), ExitCode.UNREACHABLE)
    hint = ""
    if code_name == "RESOURCE_EXHAUSTED":
        hint = "; the servers stayed busy: retry later, raise --retries/--deadline, or send fewer prompts"
    elif code_name == "UNIMPLEMENTED":
        hint = "; is --server a flux2-split encoder server?"
    return CliError(f"{_servers(context)} refused the request ({code_name}: {detail}){hint}", ExitCode.SERVER)


def _unreachable_message(code_name: str, detail: str, context: FailureContext) -> str:
    lowered = detail.lower()
    resume = "; what was encoded is saved: rerun the same command to resume" if context.resumable else ""
    if code_name == "DEADLINE_EXCEEDED":
        timeout = f" ({context.timeout:g} s)" if context.timeout else ""
        return (
            f"{_servers(context)} did not answer within --timeout{timeout}: {detail}; raise --timeout or "
            f"check the server's load{resume}"
        )
    if "ssl" in lowered or "handshake" in lowered or "tls" in lowered or "certificate" in lowered:
        hint = (
            "the server may not use TLS: drop --tls, or check --root-certs"
            if context.tls
            else "the server may use TLS: add --tls (and --root-certs for a private CA)"
        )
    elif "resolv" in lowered or "lookup" in lowered:
        hint = "check the host name in --server"
    elif not context.tls and ("socket closed" in lowered or "connection reset" in lowered):
        hint = "if the server uses TLS, add --tls"
    else:
        hint = "check that it runs and that --server is host:port of its gRPC port (or its /predict URL)"
    went_away = " (it went away mid-run)" if code_name == "CANCELLED" else ""
    return f"cannot reach {_servers(context)}{went_away}: {detail}; {hint}{resume}"


# -- model files on the hub or on disk -------------------------------------------------------------------
def hub_failure_message(exc: BaseException, repo: str, revision: str | None = None) -> str | None:
    """What a huggingface_hub error while fetching from `repo` means for the user; None if `exc` is not one."""
    hub = "huggingface_hub.errors"
    at = f" at revision {revision!r}" if revision else ""
    if _isinstance(exc, hub, "GatedRepoError"):
        return (
            f"{repo} is gated: accept its license on https://huggingface.co/{repo} and log in with `hf auth login` "
            "(or set HF_TOKEN)"
        )
    if _isinstance(exc, hub, "RepositoryNotFoundError"):
        return (
            f"no hub repo {repo} (or it is private: log in with `hf auth login` or set HF_TOKEN); a local folder "
            "must exist"
        )
    if _isinstance(exc, hub, "RevisionNotFoundError"):
        return f"{repo} has no revision {revision!r}"
    if _isinstance(exc, hub, "OfflineModeIsEnabled", "LocalEntryNotFoundError"):
        download = repo if " " not in repo else "<repo>"
        return (
            f"{repo}{at} is not in the local Hugging Face cache and the hub cannot be reached (offline, "
            f"HF_HUB_OFFLINE=1, or no network): run `hf download {download}` where there is a network, or name a "
            "local folder"
        )
    if _isinstance(exc, hub, "EntryNotFoundError"):
        return f"{repo}{at} lacks a file: {one_line(str(exc), 300)}"
    if _isinstance(exc, hub, "HFValidationError"):
        return f"{repo} is neither an existing folder nor a hub repo id (owner/name)"
    if _isinstance(exc, hub, "HfHubHTTPError"):
        return f"the Hugging Face hub failed for {repo}{at}: {one_line(str(exc), 300)}"
    return None


def _model_failure(exc: BaseException, context: FailureContext) -> CliError | None:
    # Reached only for hub errors outside the CLI's own checks (those name the argument themselves).
    repo = getattr(exc, "repo_id", None) or " or ".join(dict.fromkeys(context.models)) or "the model repo"
    message = hub_failure_message(exc, repo)
    if message is not None:
        return CliError(message, ExitCode.MODEL)
    if isinstance(exc, OSError) and ("no file named" in str(exc) or "does not appear to have" in str(exc)):
        return CliError(f"model files: {exc}", ExitCode.MODEL)
    return None


# -- memory ------------------------------------------------------------------------------------------------
def plan_summary(plan: Any) -> str:
    """One line for a `MemoryPlan`: what it keeps resident, streams and tiles, within which budget."""
    from .planner import fmt_bytes

    w = plan.workload
    resident = sum(1 for u in plan.units if u.resident)
    text = (
        f"{plan.mode} plan for {w.width}x{w.height}, {len(w.reference_sizes)} reference image(s), batch {w.batch} "
        f"in {fmt_bytes(plan.budget.vram)}: {resident}/{len(plan.units)} units resident"
    )
    if plan.mode == "stream":
        text += f", {plan.num_slots} slots of {fmt_bytes(plan.slot_bytes)}"
    text += f", activations ~{fmt_bytes(plan.activation_bytes)}, VAE {'tiled' if plan.vae_tiled else 'untiled'}"
    return text


def _memory_failure(exc: BaseException, context: FailureContext) -> CliError | None:
    if _isinstance(exc, "flux2_client.planner", "PlanError"):
        text = str(exc)
        return CliError(f"--vram: {text}" if text.startswith("vram") else text, ExitCode.MEMORY)
    if _isinstance(exc, "torch", "OutOfMemoryError"):
        plan = getattr(exc, "memory_plan", None)
        tried = (
            f" with the {plan_summary(plan)}" if plan is not None else " (no memory plan: --offload none/leaf_level)"
        )
        return CliError(
            f"out of GPU memory{tried}: another process may hold memory; lower --vram to what is really free, "
            "or generate smaller (--width/--height, fewer --image, --num-images-per-prompt)",
            ExitCode.MEMORY,
        )
    if isinstance(exc, MemoryError):
        return CliError(
            f"out of host memory{': ' + str(exc) if str(exc) else ''}; close other programs or use a machine "
            "with more RAM",
            ExitCode.MEMORY,
        )
    return None


def servers_of(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)
