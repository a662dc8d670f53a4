"""`flux2-encoder-server serve [flags]`: see `--help` for every setting."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence

from .logs import configure_logging
from .settings import Settings


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: flux2-encoder-server serve [--help] [flags]\n\nRun `flux2-encoder-server serve --help`.")
        return 0 if argv else 2
    if argv[0] != "serve":
        print(f"unknown command {argv[0]!r}; did you mean `serve`?", file=sys.stderr)
        return 2
    settings = Settings.from_cli(argv[1:], os.environ)
    configure_logging(settings.log_level, settings.log_format)
    try:
        from .server import serve
    except ImportError as exc:  # the heavy deps live in the `server` extra
        print(f"missing dependency {exc.name!r}: pip install 'flux2-split[server]'", file=sys.stderr)
        return 1
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
