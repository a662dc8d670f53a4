"""The encoder-server flags `flux2-client generate` and `flux2-client encode` share, and the `EncoderPool`
they describe. Pure Python at import time: the CLI must reject bad arguments without torch."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._arg_types import at_least_one, encoder_target, positive_seconds

if TYPE_CHECKING:
    from .cache import EmbeddingCache
    from .endpoints import EncoderPool

#: The one place the client reads a token from the environment.
TOKEN_ENV = "FLUX2_ENCODER_TOKEN"


def add_pool_args(p: argparse.ArgumentParser, *, timeout: float) -> None:
    p.add_argument(
        "--server",
        action="append",
        default=[],
        type=encoder_target,
        help="encoder server: host:port or another gRPC target (dns:///name:port), or the HTTP /predict URL "
        "(http[s]://…); repeat for several: requests spread, failed servers are skipped",
    )
    p.add_argument(
        "--encoder-model",
        default=None,
        metavar="NAME",
        help="the served model to encode with, on servers hosting several (default: the one matching the DiT's "
        "embedding width when generating, else the servers' default)",
    )
    p.add_argument("--timeout", type=positive_seconds, default=timeout, help="deadline of one encoder request, seconds")
    p.add_argument(
        "--deadline", type=positive_seconds, default=None, help="deadline over all retries and servers, seconds"
    )
    p.add_argument("--retries", type=at_least_one, default=6, help="encoder attempts over all servers")
    p.add_argument("--expect-fingerprint", default=None, help="refuse embeddings from any other model digest")
    p.add_argument(
        "--token",
        default=None,
        help=f"bearer token for the encoder servers (default: the {TOKEN_ENV} environment variable)",
    )
    p.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --root-certs)")
    p.add_argument("--root-certs", type=Path, default=None, help="PEM CA bundle of the servers' certificates")
    p.add_argument("--client-cert", type=Path, default=None, help="PEM certificate chain for mutual TLS")
    p.add_argument("--client-key", type=Path, default=None, help="PEM private key for mutual TLS")


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    """The clients' auth/TLS options from the flags."""
    if (args.client_cert is None) != (args.client_key is None):
        raise SystemExit("--client-cert and --client-key go together (mutual TLS)")

    def read(path: Path | None) -> bytes | None:
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError as exc:
            raise SystemExit(f"cannot read {path}: {exc}") from None

    return {
        "token": args.token or os.environ.get(TOKEN_ENV) or None,
        "tls": args.tls,
        "root_certificates": read(args.root_certs),
        "client_certificate": read(args.client_cert),
        "client_private_key": read(args.client_key),
    }


def pool_from_args(args: argparse.Namespace, *, cache: EmbeddingCache | None = None) -> EncoderPool:
    """The pool over every `--server`, with the flags' deadlines, retries, pinning, token and TLS."""
    from .endpoints import EncoderPool, RetryPolicy

    if not args.server:
        raise SystemExit("--server is required (repeat it for several servers)")
    if args.retries < 1:
        raise SystemExit(f"--retries must be at least 1, got {args.retries}")
    try:
        return EncoderPool(
            args.server,
            model=args.encoder_model,
            timeout=args.timeout,
            expected_fingerprint=args.expect_fingerprint,
            retry=RetryPolicy(attempts=args.retries, deadline=args.deadline),
            cache=cache,
            **client_options(args),
        )
    except ValueError as exc:
        raise SystemExit(f"--server: {exc}") from None
