"""flux2-split encoder server: FLUX.2 prompt embeddings over gRPC and HTTP /predict.

Heavy modules (torch, transformers, grpc) load on first use of the names that need them, so
`import flux2_encoder_server` stays cheap and a missing `server` extra gives a clear message.
"""

from __future__ import annotations

from typing import Any

from ._version import __version__

_EXPORTS = {
    "EncoderCore": "core",
    "EncoderEngine": "engine",
    "EncoderServer": "server",
    "LIVENESS_SERVICE": "server",
    "model_health_service": "server",
    "ModelSpec": "settings",
    "Fingerprint": "fingerprint",
    "Settings": "settings",
    "SecretStr": "settings",
    "serve": "server",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flux2_encoder_server' has no attribute {name!r}")
    import importlib

    try:
        mod = importlib.import_module(f".{module}", __name__)
    except ImportError as exc:
        raise ImportError(f"{name} needs {exc.name!r}: pip install 'flux2-split[server]'") from exc
    return getattr(mod, name)
