"""The gRPC front-end: the TextEncoder service over the core, plus health and reflection."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import grpc
from flux2split_proto import API_VERSION, SERVICE_NAME, codec
from flux2split_proto.v1 import encoder_pb2 as pb
from flux2split_proto.v1 import encoder_pb2_grpc as pb_grpc

from . import __version__
from .core import EncoderCore
from .engine import Fingerprint
from .errors import InvalidArgument, ServiceError

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": pb.DTYPE_BFLOAT16, "float16": pb.DTYPE_FLOAT16, "float32": pb.DTYPE_FLOAT32}
_BATCHING_MODES = {"dynamic": pb.BATCHING_MODE_DYNAMIC, "reproducible": pb.BATCHING_MODE_REPRODUCIBLE}


def fingerprint_message(fp: Fingerprint) -> pb.ModelFingerprint:
    return pb.ModelFingerprint(
        family=fp.family,
        weights_id=fp.weights_id,
        revision=fp.revision,
        hidden_layers=list(fp.hidden_layers),
        max_length=fp.max_length,
        dtype=_DTYPES[fp.dtype],
        digest=fp.digest,
        precision=fp.precision,
    )


class TextEncoderService(pb_grpc.TextEncoderServicer):
    def __init__(self, core: EncoderCore):
        self.core = core

    async def Encode(
        self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EncodeResponse]:
        request_id = request.request_id or uuid.uuid4().hex[:16]
        try:
            if request.format not in pb.TensorFormat.values():
                raise InvalidArgument(f"format: unknown TensorFormat value {request.format}")
            result = await self.core.encode(
                list(request.prompts),
                expected_fingerprint=request.expected_fingerprint,
                timeout=context.time_remaining(),
            )
            # Hashing and copying 15.7 MB per prompt must not stall the event loop.
            payload = await asyncio.to_thread(codec.serialize, result.embeds, request.format)
        except ServiceError as exc:
            log.info("request %s failed: %s %s", request_id, exc.grpc_code.name, exc)
            await context.abort(exc.grpc_code, str(exc))
            return
        assert self.core.fingerprint is not None
        yield pb.EncodeResponse(
            header=payload.header(
                fingerprint=fingerprint_message(self.core.fingerprint),
                cache_hit=result.cache_hit,
                request_id=request_id,
                batching_mode=_BATCHING_MODES[self.core.fingerprint.batching_mode],
            )
        )
        for chunk in codec.iter_chunks(payload.data, self.core.settings.chunk_bytes):
            yield chunk

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        if self.core.fingerprint is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
        s = self.core.settings
        assert self.core.fingerprint is not None
        return pb.InfoResponse(
            fingerprint=fingerprint_message(self.core.fingerprint),
            embedding_dim=self.core.embedding_dim,
            limits=pb.ServerLimits(
                max_prompts_per_request=s.max_prompts_per_request,
                max_prompt_chars=s.max_prompt_chars,
                chunk_bytes=s.chunk_bytes,
                max_queued_requests=s.max_queued_requests,
            ),
            server_version=__version__,
            api_version=API_VERSION,
            batching_mode=_BATCHING_MODES[self.core.fingerprint.batching_mode],
        )


__all__ = ["SERVICE_NAME", "TextEncoderService", "fingerprint_message"]
