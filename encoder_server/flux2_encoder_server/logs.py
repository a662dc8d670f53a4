"""Structured logging: one JSON object per line, and the per-request access log."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from flux2split_proto.jsonlog import JsonFormatter

#: One line per finished request; its record carries the request's fields in `record.fields`.
access_log = logging.getLogger("flux2_encoder_server.access")


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return text


def resolve_log_format(fmt: str, stream: TextIO) -> str:
    """ "auto": text for a person at a terminal, JSON for a log collector (anything that is not a TTY)."""
    if fmt != "auto":
        return fmt
    isatty = getattr(stream, "isatty", None)
    return "text" if callable(isatty) and isatty() else "json"


def configure_logging(level: str, fmt: str, stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if resolve_log_format(fmt, stream) == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
