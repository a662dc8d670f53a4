"""flux2-split client: FLUX.2 generation on small GPUs from a remote encoder's embeddings.

Heavy modules (torch, diffusers) load on first use of the names that need them, so
`import flux2_client` stays cheap and a missing extra gives a clear message.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Encoder": "encoder",
    "EncodeResult": "encoder",
    "EncoderInfo": "encoder",
    "RemoteEncoderError": "encoder",
    "FingerprintMismatchError": "encoder",
    "RemoteTextEncoder": "remote",
    "HttpTextEncoder": "http_encoder",
    "HttpEncoderError": "http_encoder",
    "EncoderPool": "endpoints",
    "RetryPolicy": "endpoints",
    "EmbeddingCache": "cache",
    "compute_remote_text_embeddings": "training",
    "open_encoder": "training",
    "read_captions": "captions",
    "EmbeddingShards": "shards",
    "ShardFingerprintError": "shards",
    "BulkResult": "bulk",
    "encode_captions": "bulk",
    "GenerationParams": "generation",
    "generate": "generation",
    "generate_to_files": "generation",
    "load_pipeline": "generation",
    "LoraKeyError": "lora",
    "LoraSourceError": "lora",
    "LoraSpec": "lora",
    "load_loras": "lora",
    "resolve_loras": "lora",
    "TURBO_LORA": "turbo",
    "TURBO_SIGMAS": "turbo",
    "turbo_params": "turbo",
    "CACHE_CHOICES": "step_cache",
    "StepCacheUnsupported": "step_cache",
    "save_png": "generation",
    "Flux2RemotePipeline": "remote_pipeline",
    "Flux2KleinRemotePipeline": "remote_pipeline",
    "with_remote_text_encoder": "remote_pipeline",
    "make_tiny_flux2": "tiny",
    "Budget": "planner",
    "MemoryPlan": "planner",
    "PlanError": "planner",
    "Workload": "planner",
    "plan_memory": "planner",
    "BlockStreamer": "offload",
    "apply_memory_plan": "offload",
    "get_memory_plan": "offload",
    "plan_for": "offload",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flux2_client' has no attribute {name!r}")
    import importlib

    try:
        mod = importlib.import_module(f".{module}", __name__)
    except ImportError as exc:
        raise ImportError(f"{name} needs {exc.name!r}: pip install 'flux2-split[client]'") from exc
    return getattr(mod, name)
