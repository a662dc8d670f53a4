"""flux2-split encoder server: FLUX.2 prompt embeddings over gRPC."""

__version__ = "0.1.0"

from .engine import EncoderEngine, Fingerprint
from .server import EncoderServer
from .settings import Settings

__all__ = ["EncoderEngine", "EncoderServer", "Fingerprint", "Settings", "__version__"]
