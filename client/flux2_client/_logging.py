"""Logging for `flux2-client`: text lines on stderr for people, one JSON object per line when asked, and
the library notices that mean nothing to a user kept out of sight unless `--verbose`.

Only the CLI enters `cli_logging`; imported as a library, flux2_client logs on the `flux2_client` loggers
and leaves the handlers to the application.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
from collections.abc import Iterator
from typing import TextIO

from flux2split_proto.jsonlog import JsonFormatter

LOG_FORMATS = ("text", "json")

#: (logger name, words in the message) of library notices that say nothing a user can act on. Each is
#: matched on its own logger only, so the same words from anywhere else still show.
QUIET_NOTICES: tuple[tuple[str, str], ...] = (
    # bitsandbytes on CPUs with AVX512-BF16: an optional faster NF4 kernel from the `kernels` package is
    # missing and the built-in one runs instead (bitsandbytes/backends/cpu/ops.py).
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    # diffusers' `ModelMixin.to(dtype)` warns about modules kept in float32 even when there are none; the
    # warning with a non-empty list still shows.
    ("diffusers.models.modeling_utils", "should be kept in float32: []"),
)


class _QuietNotice(logging.Filter):
    def __init__(self, words: str):
        super().__init__()
        self.words = words

    def filter(self, record: logging.LogRecord) -> bool:
        return self.words not in record.getMessage()


class TextFormatter(logging.Formatter):
    """`message` for information, `warning: message` / `error: message` above it."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


@contextlib.contextmanager
def cli_logging(
    fmt: str = "text", *, verbose: bool = False, quiet: bool = False, stream: TextIO | None = None
) -> Iterator[logging.Handler]:
    """Route all logging (and Python warnings) to `stream` (stderr) in `fmt` while the CLI runs.

    Default: flux2_client's information and everyone's warnings, minus `QUIET_NOTICES`. `quiet`: warnings
    and errors only. `verbose`: flux2_client's debug messages and every notice. On exit the previous
    handlers, levels and filters come back (tests and Python callers run `main` more than once).
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format: expected one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root, package = logging.getLogger(), logging.getLogger("flux2_client")
    saved_handlers, saved_root_level, saved_package_level = list(root.handlers), root.level, package.level
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    package.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    filters = []
    if not verbose:
        for name, words in QUIET_NOTICES:
            # On the logger that emits the notice: a logger's filters see only its own records.
            logger, notice_filter = logging.getLogger(name), _QuietNotice(words)
            logger.addFilter(notice_filter)
            filters.append((logger, notice_filter))
    logging.captureWarnings(True)
    try:
        yield handler
    finally:
        logging.captureWarnings(False)
        for logger, notice_filter in filters:
            logger.removeFilter(notice_filter)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_root_level)
        package.setLevel(saved_package_level)


@contextlib.contextmanager
def library_logging_routed(*, model_libraries: bool = True) -> Iterator[None]:
    """Send the Hugging Face libraries' log records through the root handler (so they share the format and
    the filters above, and show once) instead of their own stderr handlers, and back on exit.

    huggingface_hub (hub downloads) always: its handler sits on its logger, which also propagates, so with
    a root handler every retry notice would show twice. diffusers and transformers with `model_libraries`,
    through their own switches; only where they load anyway (importing them is not free).
    """
    hub = logging.getLogger("huggingface_hub")
    hub_handlers, hub_propagate = list(hub.handlers), hub.propagate
    hub.handlers[:] = []
    hub.propagate = True
    routed = []
    for library in ("diffusers", "transformers") if model_libraries else ():
        try:
            utils = importlib.import_module(f"{library}.utils.logging")
        except ImportError:
            continue
        utils.disable_default_handler()
        utils.enable_propagation()
        routed.append(utils)
    try:
        yield
    finally:
        for utils in routed:
            utils.disable_propagation()
            utils.enable_default_handler()
        hub.handlers[:] = hub_handlers
        hub.propagate = hub_propagate


@contextlib.contextmanager
def no_checkpoint_writing_bars(enabled: bool = True) -> Iterator[None]:
    """Hide transformers' progress bars while tiny models are written (its `save_pretrained` shows a
    "Writing model shards" bar for a one-file checkpoint); other progress bars are left alone."""
    if not enabled:
        yield
        return
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
