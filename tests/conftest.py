from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from flux2_client.tiny import TinyPaths, make_tiny_flux2
from flux2_encoder_server import EncoderEngine
from flux2_encoder_server.testing import ServerThread, local_settings

# Two CPU cores: keep torch from oversubscribing them when a server thread and the test both compute.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyPaths:
    return make_tiny_flux2(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def engine(tiny: TinyPaths) -> EncoderEngine:
    return EncoderEngine.from_pretrained(str(tiny.pipeline), device="cpu")


@pytest.fixture(scope="session")
def reference_pipe(tiny: TinyPaths):
    """diffusers' own Flux2Pipeline on the full (unpruned) tiny text encoder: the reference."""
    from diffusers import Flux2Pipeline

    return Flux2Pipeline.from_pretrained(str(tiny.pipeline), dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def server(tiny: TinyPaths, engine: EncoderEngine) -> Iterator[ServerThread]:
    thread = ServerThread(local_settings(str(tiny.pipeline)), lambda _s: engine).start()
    yield thread
    thread.stop()
