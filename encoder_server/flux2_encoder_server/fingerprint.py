"""The model fingerprint: what a server serves, and the digest that says two servers give equal bytes.

The digest covers the embedding recipe of the family, the weights (id and revision), the dtype and the
precision tier; batching mode is reported next to it but not hashed (the contract says equal digests give
equal bytes "up to batching_mode"). The wire form is `flux2split_proto`'s ModelFingerprint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flux2split_proto import shared
from flux2split_proto.v1 import encoder_pb2 as pb

if TYPE_CHECKING:
    from .families import EncoderFamily

__all__ = ["Fingerprint", "fingerprint_message", "make_fingerprint"]


@dataclass(frozen=True)
class Fingerprint:
    family: str
    weights_id: str
    revision: str
    hidden_layers: tuple[int, ...]
    max_length: int
    dtype: str
    precision: str
    digest: str
    # Not part of `digest`: the contract says equal digests give equal bytes "up to batching_mode".
    batching_mode: str = "reproducible"
    # Not part of `digest` either: the server also holds the whole model to upsample prompts, which changes
    # no embedding byte.
    upsampling: bool = False

    @property
    def itemsize(self) -> int:
        """Bytes per element on the wire."""
        return shared.itemsize(self.dtype)


def make_fingerprint(
    family: EncoderFamily,
    *,
    weights_id: str,
    revision: str,
    dtype: Any,
    precision: str,
    batching_mode: str,
    upsampling: bool = False,
) -> Fingerprint:
    """`dtype` is a torch dtype or its name ("bfloat16")."""
    dtype_name = str(dtype).removeprefix("torch.")
    digest_fields = {
        "recipe": family.recipe_digest(),
        "revision": revision,
        "weights_id": weights_id,
        "dtype": dtype_name,
        "precision": precision,
    }
    return Fingerprint(
        family=family.name,
        weights_id=weights_id,
        revision=revision,
        hidden_layers=family.hidden_layers,
        max_length=family.max_length,
        dtype=dtype_name,
        precision=precision,
        digest=hashlib.sha256(json.dumps(digest_fields, sort_keys=True).encode()).hexdigest(),
        batching_mode=batching_mode,
        upsampling=upsampling,
    )


def fingerprint_message(fp: Fingerprint) -> pb.ModelFingerprint:
    """The fingerprint as the contract's message (the HTTP front-end's JSON is `shared.fingerprint_to_dict`)."""
    return pb.ModelFingerprint(
        family=fp.family,
        weights_id=fp.weights_id,
        revision=fp.revision,
        hidden_layers=list(fp.hidden_layers),
        max_length=fp.max_length,
        dtype=shared.DTYPE_BY_NAME[fp.dtype],
        digest=fp.digest,
        precision=fp.precision,
        upsampling=fp.upsampling,
    )
