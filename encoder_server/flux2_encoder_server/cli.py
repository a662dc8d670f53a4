"""`flux2-encoder-server serve [flags]`: see `--help` for every setting."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from collections.abc import Sequence

#: Modules of the `server` extra that `serve` needs; checked before anything else, `--help` included.
_SERVER_EXTRA = ("torch", "transformers", "grpc_health", "grpc_reflection", "prometheus_client", "starlette", "uvicorn")


def missing_server_dependency() -> str | None:
    """The first module of the `server` extra that cannot be imported, else None."""
    for name in _SERVER_EXTRA:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except (ImportError, ValueError):  # a broken or blocked install
            return name
    try:
        from . import server  # noqa: F401  (imports torch and the gRPC/HTTP stacks)
    except ImportError as exc:
        return exc.name or str(exc)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: flux2-encoder-server serve [--help] [flags]\n       flux2-encoder-server --version\n\n"
            "Run `flux2-encoder-server serve --help`."
        )
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from ._version import __version__

        print(f"flux2-encoder-server {__version__}")
        return 0
    if argv[0] != "serve":
        print(f"unknown command {argv[0]!r}; did you mean `serve`?", file=sys.stderr)
        return 2
    missing = missing_server_dependency()
    if missing is not None:  # the heavy deps live in the `server` extra
        print(f"flux2-encoder-server needs {missing!r}: pip install 'flux2-split[server]'", file=sys.stderr)
        return 1
    from .frontends import FrontendStartError
    from .ipc import RingTooSmall
    from .logs import configure_logging
    from .server import PortInUseError, serve
    from .settings import Settings

    settings = Settings.from_cli(argv[1:], os.environ)
    configure_logging(settings.log_level, settings.log_format)
    try:
        asyncio.run(serve(settings))
    except (PortInUseError, RingTooSmall, FrontendStartError) as exc:  # one line, no traceback
        print(f"flux2-encoder-server: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
