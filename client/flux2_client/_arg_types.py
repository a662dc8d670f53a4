"""argparse types of the client's flags: each refuses a bad value when the command line is parsed, with
a message naming the rule (argparse adds the flag). Pure Python: the CLI rejects arguments without torch."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from urllib.parse import urlsplit

from .planner import GiB, fmt_bytes, parse_size

#: The smallest --vram that can mean anything: the CUDA context and workspaces alone take most of it.
MIN_VRAM = 1 * GiB

_GRPC_SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")
_HOST_PORT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>[0-9]+)")


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text!r}")
    return value


def at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def vram_size(text: str) -> str:
    try:
        size = parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive size like 8GB or 6000MB (at least {fmt_bytes(MIN_VRAM)}), got {text!r}"
        ) from None
    if size < MIN_VRAM:
        raise argparse.ArgumentTypeError(
            f"must be at least {fmt_bytes(MIN_VRAM)} (the CUDA context alone takes most of that), got {text!r}"
        )
    return text


def encoder_target(text: str) -> str:
    """host:port (or [v6]:port) with a port from 1 to 65535, a gRPC target with a scheme (dns:///name:port,
    unix:/path), or an http(s):// URL with a host (the /predict front-end)."""
    if text.startswith(_GRPC_SCHEMES):
        return text
    if text.startswith(("http://", "https://")):
        try:
            host, port = urlsplit(text).hostname, urlsplit(text).port
        except ValueError:  # a port that is not a number or out of range
            host, port = None, None
        if host and (port is None or 1 <= port <= 65535):
            return text
        raise argparse.ArgumentTypeError(f"expected an http(s)://host[:port]/predict URL, got {text!r}")
    match = _HOST_PORT.fullmatch(text)
    if match is None or not 1 <= int(match.group("port")) <= 65535:
        raise argparse.ArgumentTypeError(
            f"expected host:port with a port from 1 to 65535 (or an http(s):// /predict URL), got {text!r}"
        )
    return text


#: Flags whose value may start with "-" ("--vram -5GB"): argparse would take that value for an option and
#: say "expected one argument"; passed as "--vram=-5GB" instead, it reaches the flag's type and is refused
#: there with the rule.
SIGNED_VALUE_FLAGS = ("--vram", "--guidance", "--timeout", "--deadline")


def join_signed_values(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    items = list(argv)
    i = 0
    while i < len(items):
        if items[i] == "--":
            out += items[i:]
            break
        if items[i] in SIGNED_VALUE_FLAGS and i + 1 < len(items) and re.match(r"-[^-]", items[i + 1]):
            out.append(f"{items[i]}={items[i + 1]}")
            i += 2
            continue
        out.append(items[i])
        i += 1
    return out
