from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from _servers import ServerThread, test_settings
from flux2_client.tiny import TinyPaths, make_tiny_flux2
from flux2_client.tiny_klein import TinyKleinPaths, make_tiny_klein
from flux2_encoder_server import EncoderEngine

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
    thread = ServerThread(test_settings(str(tiny.pipeline)), lambda _s: engine).start()
    yield thread
    thread.stop()


# --- client pipelines: the client's streamed path and diffusers' resident NF4 reference ----------------


@pytest.fixture(scope="session")
def streamed_pipe(tiny: TinyPaths):
    """The client's pipeline on the planner's path, on the CPU: the NF4 DiT loaded from disk under a
    budget that holds the fixed costs plus 2.5 blocks, so some parts stay resident and the others
    stream from the host buffer through two slots (the block streamer's copies between two buffers)."""
    from diffusers import AutoencoderKLFlux2
    from flux2_client._quantization import load_nf4_transformer
    from flux2_client.generation import load_pipeline
    from flux2_client.offload import spec_from_module
    from flux2_client.planner import Workload, _group_units, activation_bytes, vae_decode_bytes

    # The largest call the generation tests make: 64x64, two reference images, two images per call.
    workload = Workload(64, 64, reference_sizes=((64, 64), (64, 96)), batch=2)
    spec = spec_from_module(
        load_nf4_transformer(str(tiny.nf4_repo), device="cpu"),
        AutoencoderKLFlux2.from_pretrained(str(tiny.pipeline), subfolder="vae", dtype=torch.bfloat16),
    )
    work = max(activation_bytes(spec, workload), vae_decode_bytes(spec, workload, tiled=False))
    block = max(n for _, n in _group_units(spec, "block"))
    vram = int((spec.other_bytes + spec.vae_bytes + work + 2.5 * block) / 0.94)  # the planner keeps a 6% margin
    return load_pipeline(
        str(tiny.pipeline), dit=str(tiny.nf4_repo), device="cpu", offload="plan", vram=vram, workload=workload
    )


@pytest.fixture(scope="session")
def resident_nf4_pipe(tiny: TinyPaths):
    """The reference: diffusers' own Flux2Pipeline (its own text encoder) with the same pre-quantized NF4
    DiT, loaded by diffusers and kept whole in memory: no offloading, no hooks."""
    from diffusers import Flux2Pipeline, Flux2Transformer2DModel
    from flux2_client._quantization import allow_bnb_on_cpu

    with allow_bnb_on_cpu():
        transformer = Flux2Transformer2DModel.from_pretrained(
            str(tiny.nf4_repo), subfolder="transformer", dtype=torch.bfloat16, device_map="cpu"
        )
    return Flux2Pipeline.from_pretrained(str(tiny.pipeline), transformer=transformer, dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def tiny_klein(tmp_path_factory: pytest.TempPathFactory) -> TinyKleinPaths:
    """Tiny FLUX.2 [klein] pipelines (distilled and base) and the NF4 Klein DiT; built only by tests that ask."""
    return make_tiny_klein(tmp_path_factory.mktemp("klein-models"))
