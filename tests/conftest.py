from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flux2_client.tiny import TinyPaths, make_tiny_flux2
from flux2_client.tiny_klein import TinyKleinPaths, make_tiny_klein
from flux2_encoder_server import EncoderEngine
from flux2_encoder_server.testing import FakeEngine, ServerThread, local_settings

# One intra-op thread per process, subprocesses included: a server's model thread and the test's own
# reference computations run at the same time, and OpenMP teams of two on two busy cores spin against each
# other (measured: a tiny fp32 linear 1.2 ms with one thread, 21 ms with two under load; the server test
# files 1.7x faster). The tiny models gain nothing from a second thread.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


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


@pytest.fixture
def uncapped_cuda_allocator() -> Iterator[None]:
    """`load_pipeline(vram=...)` caps this process's CUDA allocator; give the next GPU test the whole card."""
    yield
    torch.cuda.synchronize()
    torch.cuda.set_per_process_memory_fraction(1.0, 0)
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def rows_engine() -> FakeEngine:
    """A stand-in model with a row of its own for every prompt, drawn from the prompt's hash: for tests of
    what the server, pool or bulk encoder do with rows (a row answered for the wrong prompt shows). The real
    model's bytes against diffusers are test_embeddings_exact's job, and the tiny model's bf16 forward costs
    about half a second per prompt on a CPU without native bf16."""
    return FakeEngine(distinct_rows=None)


@pytest.fixture(scope="module")
def server(tiny: TinyPaths, engine: EncoderEngine) -> Iterator[ServerThread]:
    thread = ServerThread(local_settings(str(tiny.pipeline)), lambda _s: engine).start()
    yield thread
    thread.stop()


# --- client pipelines: the client's streamed path and diffusers' resident NF4 reference ----------------


def streaming_budget(tiny: TinyPaths, workload, extra_resident: int = 0) -> int:
    """A CPU budget (no CUDA overhead) that holds the fixed costs (plus `extra_resident` bytes, e.g. LoRA
    adapters) and 2.5 blocks of the tiny NF4 DiT, so a plan keeps some parts resident and streams the others
    through two slots."""
    from diffusers import AutoencoderKLFlux2
    from flux2_client._quantization import load_nf4_transformer
    from flux2_client.offload import spec_from_module
    from flux2_client.planner import _group_units, activation_bytes, vae_decode_bytes

    spec = spec_from_module(
        load_nf4_transformer(str(tiny.nf4_repo), device="cpu"),
        AutoencoderKLFlux2.from_pretrained(str(tiny.pipeline), subfolder="vae", dtype=torch.bfloat16),
    )
    work = max(activation_bytes(spec, workload), vae_decode_bytes(spec, workload, tiled=False))
    block = max(n for _, n in _group_units(spec, "block"))
    fixed = spec.other_bytes + extra_resident + spec.vae_bytes
    return int((fixed + work + 2.5 * block) / 0.94)  # the planner keeps a 6% margin


@pytest.fixture(scope="session")
def streamed_pipe(tiny: TinyPaths):
    """The client's pipeline on the planner's path, on the CPU: the NF4 DiT loaded from disk under a
    budget that holds the fixed costs plus 2.5 blocks, so some parts stay resident and the others
    stream from the host buffer through two slots (the block streamer's copies between two buffers)."""
    from flux2_client.generation import load_pipeline
    from flux2_client.planner import Workload

    # The largest call the generation tests make: 64x64, two reference images, two images per call.
    workload = Workload(64, 64, reference_sizes=((64, 64), (64, 96)), batch=2)
    vram = streaming_budget(tiny, workload)
    return load_pipeline(
        str(tiny.pipeline), dit=str(tiny.nf4_repo), device="cpu", offload="plan", vram=vram, workload=workload
    )


def diffusers_nf4_transformer(tiny: TinyPaths):
    """The tiny pre-quantized NF4 DiT loaded by diffusers itself (past its "No GPU found" check only).

    bitsandbytes' avx512_bf16 CPU repack is switched off, as the client does: its in-place inverse in
    `state_dict()` is lossy (docs/design.md, "LoRA"), so a reference that took that path would change under
    `load_lora_weights`; with it off the reference computes with bitsandbytes' canonical NF4 kernels."""
    from diffusers import Flux2Transformer2DModel
    from flux2_client._quantization import allow_bnb_on_cpu, keep_canonical_nf4_layout

    with allow_bnb_on_cpu():
        transformer = Flux2Transformer2DModel.from_pretrained(
            str(tiny.nf4_repo), subfolder="transformer", dtype=torch.bfloat16, device_map="cpu"
        )
    keep_canonical_nf4_layout(transformer)
    return transformer


@pytest.fixture(scope="session")
def resident_nf4_pipe(tiny: TinyPaths):
    """The reference: diffusers' own Flux2Pipeline (its own text encoder) with the same pre-quantized NF4
    DiT, loaded by diffusers and kept whole in memory: no offloading, no hooks."""
    from diffusers import Flux2Pipeline

    return Flux2Pipeline.from_pretrained(
        str(tiny.pipeline), transformer=diffusers_nf4_transformer(tiny), dtype=torch.bfloat16
    )


@pytest.fixture(scope="session")
def tiny_klein(tmp_path_factory: pytest.TempPathFactory) -> TinyKleinPaths:
    """Tiny FLUX.2 [klein] pipelines (distilled and base) and the NF4 Klein DiT; built only by tests that ask."""
    return make_tiny_klein(tmp_path_factory.mktemp("klein-models"))


@pytest.fixture(scope="session")
def klein_engine(tiny_klein: TinyKleinPaths) -> EncoderEngine:
    """The server's engine over the tiny distilled Klein model (pruned Qwen3)."""
    return EncoderEngine.from_pretrained(str(tiny_klein.distilled), device="cpu")


@pytest.fixture(scope="session")
def klein_reference(tiny_klein: TinyKleinPaths):
    """diffusers' Flux2KleinPipeline with its full (unpruned) Qwen3 encoder and the NF4 Klein DiT."""
    from diffusers import Flux2KleinPipeline
    from flux2_client._quantization import load_nf4_transformer

    transformer = load_nf4_transformer(str(tiny_klein.nf4_repo), device="cpu")
    return Flux2KleinPipeline.from_pretrained(str(tiny_klein.distilled), transformer=transformer, dtype=torch.bfloat16)


# -- TLS ------------------------------------------------------------------------------------------------


def _certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, all signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def build(subject, issuer, public_key, signing_key, *, ca=False, san=None, usage=None):
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        return builder.sign(signing_key, hashes.SHA256())

    def pem_key(key) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = build(name("flux2-split test CA"), name("flux2-split test CA"), ca_key.public_key(), ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = build(
        name("localhost"),
        ca.subject,
        server_key.public_key(),
        ca_key,
        san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        usage=[ExtendedKeyUsageOID.SERVER_AUTH],
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = build(
        name("trainer-7"), ca.subject, client_key.public_key(), ca_key, usage=[ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    files = {
        "ca": ca.public_bytes(serialization.Encoding.PEM),
        "server_cert": server.public_bytes(serialization.Encoding.PEM),
        "server_key": pem_key(server_key),
        "client_cert": client.public_bytes(serialization.Encoding.PEM),
        "client_key": pem_key(client_key),
    }
    paths = {}
    for key, data in files.items():
        paths[key] = folder / f"{key}.pem"
        paths[key].write_bytes(data)
    return paths


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> dict[str, Path]:
    """TLS material for tests that serve TLS (security tests, front-end processes)."""
    return _certificates(tmp_path_factory.mktemp("certs"))
