"""The engine's fast paths against the reference: hook capture, batching modes, precision tiers, compile.

The reference is diffusers' Flux2Pipeline._get_mistral_3_small_prompt_embeds on the full (40-layer) tiny
text encoder. bf16 paths must be bit-identical to it; quantized tiers can only be close (stated bounds).
"""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from flux2_client.remote import RemoteTextEncoder
from flux2_encoder_server import EncoderEngine, Settings
from flux2_encoder_server.engine import BATCHING_MODES
from flux2_encoder_server.precision import PRECISIONS, Fp8Linear, fp8_unsupported_reason, module_bytes
from flux2_encoder_server.testing import ServerThread, local_settings
from flux2split_proto.v1 import encoder_pb2 as pb

# torch 2.13 (CI) runs row-wise fp8 matmuls on the CPU; older releases (2.11 on the GPU machine) refuse.
_CPU_FP8 = fp8_unsupported_reason(torch.device("cpu"))
needs_cpu_fp8 = pytest.mark.skipif(_CPU_FP8 is not None, reason=f"row-wise fp8 on the CPU: {_CPU_FP8}")

PROMPTS = ["a red fox sleeping in fresh snow", "[IMG]a cat", "", "un café à Paris " * 12, "two dogs"]


def diffusers_embeds(pipe, prompts: list[str]) -> torch.Tensor:
    from diffusers import Flux2Pipeline

    return Flux2Pipeline._get_mistral_3_small_prompt_embeds(
        text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, prompt=prompts, device=torch.device("cpu")
    )


@pytest.mark.parametrize("mode", BATCHING_MODES)
def test_from_model_is_bit_identical_and_leaves_the_model_alone(reference_pipe, mode):
    full = reference_pipe.text_encoder
    engine = EncoderEngine.from_model(full, reference_pipe.tokenizer, batching_mode=mode)
    want = diffusers_embeds(reference_pipe, PROMPTS)
    assert torch.equal(engine.encode(PROMPTS), want)
    for i, prompt in enumerate(PROMPTS[:3]):
        assert torch.equal(engine.encode([prompt]), want[i : i + 1])
    # The engine shares the first 30 layers; the full model keeps its 40 layers and its final norm.
    assert len(full.model.language_model.layers) == 40
    assert not isinstance(full.model.language_model.norm, torch.nn.Identity)
    assert len(engine.decoder.layers) == 30
    assert torch.equal(diffusers_embeds(reference_pipe, PROMPTS[:2]), want[:2])


def test_reproducible_mode_never_runs_a_batch_of_one(reference_pipe):
    repro = EncoderEngine.from_model(reference_pipe.text_encoder, reference_pipe.tokenizer)
    dynamic = EncoderEngine.from_model(reference_pipe.text_encoder, reference_pipe.tokenizer, batching_mode="dynamic")
    assert repro.batching_mode == "reproducible"  # the default
    repro.encode(["alone"])
    dynamic.encode(["alone"])
    repro.encode(["a", "b", "c"])
    assert repro.batch_sizes == {2: 1, 3: 1}
    assert dynamic.batch_sizes == {1: 1}
    # The mode is reported, but it does not change the digest: equal digests mean equal models.
    assert repro.fingerprint.batching_mode == "reproducible"
    assert dynamic.fingerprint.batching_mode == "dynamic"
    assert repro.fingerprint.digest == dynamic.fingerprint.digest


def test_served_header_reports_the_batching_mode(tiny, reference_pipe, server):
    with RemoteTextEncoder(server.target) as enc:
        assert enc.encode("x").header.batching_mode == pb.BATCHING_MODE_REPRODUCIBLE
        assert enc.info().batching_mode == pb.BATCHING_MODE_REPRODUCIBLE
    dynamic = EncoderEngine.from_model(reference_pipe.text_encoder, reference_pipe.tokenizer, batching_mode="dynamic")
    thread = ServerThread(local_settings(str(tiny.pipeline)), lambda _s: dynamic).start()
    try:
        with RemoteTextEncoder(thread.target) as enc:
            got = enc.encode(["x", "y"])
            assert got.header.batching_mode == pb.BATCHING_MODE_DYNAMIC
            assert enc.info().batching_mode == pb.BATCHING_MODE_DYNAMIC
        assert torch.equal(got.prompt_embeds, diffusers_embeds(reference_pipe, ["x", "y"]))
    finally:
        thread.stop()


@needs_cpu_fp8
def test_fp8_linear_matches_its_dequantized_math():
    """The _scaled_mm plumbing (operand layout, scale shapes) against float64 on the same fp8 values."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(96, 64, generator=gen).to(torch.bfloat16)
    x = (torch.randn(2, 7, 64, generator=gen) * 3).to(torch.bfloat16)
    layer = Fp8Linear(weight)
    got = layer(x)
    assert got.shape == (2, 7, 96) and got.dtype == torch.bfloat16
    w_deq = layer.weight.double() * layer.weight_scale.double().t()
    rows = x.reshape(-1, 64).double()
    scale = rows.abs().amax(-1, keepdim=True) / 448
    x_deq = (rows / scale).float().to(torch.float8_e4m3fn).double() * scale
    want = (x_deq @ w_deq.t()).reshape(2, 7, 96)
    assert ((got.double() - want).norm() / want.norm()) < 4e-3  # bf16 rounding of the output
    exact = x.double() @ weight.double().t()
    assert ((got.double() - exact).norm() / exact.norm()) < 0.08  # e4m3 keeps 3 mantissa bits


@pytest.mark.parametrize("precision", [pytest.param("fp8", marks=needs_cpu_fp8), "int8", "nf4"])
def test_quantized_tiers_are_close_not_identical(reference_pipe, precision):
    full = reference_pipe.text_encoder
    bf16 = EncoderEngine.from_model(full, reference_pipe.tokenizer)
    quant = EncoderEngine.from_model(full, reference_pipe.tokenizer, precision=precision)
    want = bf16.encode(PROMPTS[:2]).float()
    got = quant.encode(PROMPTS[:2]).float()
    cosine = torch.nn.functional.cosine_similarity(got.flatten(1), want.flatten(1))
    # Toy width (64) makes quantization noise large (measured on this model: cosine 0.99 fp8, 0.9996 int8,
    # 0.956 nf4); a wrong scale or transposed operand gives cosine near 0.
    assert (cosine > 0.9).all(), cosine
    assert not torch.equal(got, want)
    assert quant.fingerprint.precision == precision
    assert quant.fingerprint.digest != bf16.fingerprint.digest
    linear_types = {type(m).__name__ for m in quant.decoder.layers.modules() if "Linear" in type(m).__name__}
    assert "Linear" not in linear_types, linear_types
    assert module_bytes(quant.decoder.layers) < module_bytes(bf16.decoder.layers)
    # The bf16 layers the tier was made from are untouched.
    assert torch.equal(bf16.encode(PROMPTS[:2]).float(), want)


@needs_cpu_fp8
def test_from_pretrained_quantizes_like_from_model(tiny, reference_pipe):
    loaded = EncoderEngine.from_pretrained(str(tiny.pipeline), device="cpu", precision="fp8")
    built = EncoderEngine.from_model(reference_pipe.text_encoder, reference_pipe.tokenizer, precision="fp8")
    assert torch.equal(loaded.encode(PROMPTS[:2]), built.encode(PROMPTS[:2]))
    assert loaded.fingerprint.precision == "fp8"


def test_from_pretrained_quantizes_nf4_like_from_model(tiny, reference_pipe):
    """The NF4 half, apart from the fp8 skip: bitsandbytes' NF4 runs on the CPU."""
    loaded = EncoderEngine.from_pretrained(str(tiny.pipeline), device="cpu", precision="nf4")
    built = EncoderEngine.from_model(reference_pipe.text_encoder, reference_pipe.tokenizer, precision="nf4")
    assert {type(m).__name__ for m in loaded.decoder.layers[0].modules()} >= {"Linear4bit"}
    assert loaded.fingerprint.precision == built.fingerprint.precision == "nf4"
    got, same_path = loaded.encode(PROMPTS[:2]).float(), built.encode(PROMPTS[:2]).float()
    want = diffusers_embeds(reference_pipe, PROMPTS[:2]).float()
    # bitsandbytes repacks NF4 weights for its CPU kernels depending on how the layer got there, which
    # moves results by ~1.5% on CPU; so the two paths are compared with a bound, not byte for byte, and
    # each against diffusers' bf16 (NF4 on this toy width: cosine ~0.96; a wrong layer gives ~0).
    assert (torch.nn.functional.cosine_similarity(got.flatten(1), same_path.flatten(1)) > 0.99).all()
    for embeds in (got, same_path):
        cosine = torch.nn.functional.cosine_similarity(embeds.flatten(1), want.flatten(1))
        assert (cosine > 0.9).all(), cosine
        assert not torch.equal(embeds, want)


def test_settings_choices_follow_the_engine():
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    assert fields["precision"].metadata["choices"] == PRECISIONS
    assert fields["batching_mode"].metadata["choices"] == BATCHING_MODES
    parsed = Settings.from_cli(["--precision", "nf4", "--batching-mode", "dynamic", "--compile"], {})
    assert (parsed.precision, parsed.batching_mode, parsed.compile) == ("nf4", "dynamic", True)
    assert Settings.from_cli([], {"FLUX2_ENCODER_PRECISION": "fp8"}).precision == "fp8"
    assert Settings().batching_mode == "reproducible"
    with pytest.raises(SystemExit):
        Settings.from_cli(["--precision", "fp4"], {})


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
def test_compiled_engine_is_close_and_batch_invariant(reference_pipe):
    import torch._dynamo

    torch._dynamo.reset()
    full = reference_pipe.text_encoder
    eager = EncoderEngine.from_model(full, reference_pipe.tokenizer)
    # Two prompts: a lone prompt runs in a batch of two in reproducible mode, so every call below is one
    # compiled shape (each new shape is another inductor compile, ~15 s on two CPU cores).
    prompts = PROMPTS[:2]
    want = eager.encode(prompts)  # before compiling: the engines share the layers
    compiled = EncoderEngine.from_model(full, reference_pipe.tokenizer, compile=True)
    try:
        assert compiled.compiled and compiled.fingerprint.precision == "bf16+compiled"
        assert compiled.fingerprint.digest != eager.fingerprint.digest
        batch = compiled.encode(prompts)
        # Fused kernels keep intermediates in float32 where eager rounds each op to bf16: close, not equal.
        rel = (batch.float() - want.float()).norm() / want.float().norm()
        assert rel < 0.05, rel
        for i in range(2):
            assert torch.equal(compiled.encode([prompts[i]]), batch[i : i + 1])
    finally:
        compiled.uncompile()  # the layers are shared with `full` and `eager`: their eager forward comes back
    assert not compiled.compiled and compiled.fingerprint == eager.fingerprint
    assert torch.equal(eager.encode(prompts), want)
    assert torch.equal(compiled.encode(prompts), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU batch-shape kernels: needs CUDA")
def test_reproducible_mode_on_cuda_gives_the_same_bytes_at_every_batch_size(reference_pipe):
    import copy

    full = copy.deepcopy(reference_pipe.text_encoder).to("cuda")
    engine = EncoderEngine.from_model(full, reference_pipe.tokenizer)
    alone = engine.encode([PROMPTS[0]])
    for size in (2, 3, 8, 32):
        batch = [PROMPTS[0]] + [f"other prompt {i}" for i in range(size - 1)]
        assert torch.equal(engine.encode(batch)[:1], alone)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch._scaled_mm fp8 on a GPU: needs CUDA")
def test_fp8_tier_on_cuda(reference_pipe):
    import copy

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9+")
    full = copy.deepcopy(reference_pipe.text_encoder).to("cuda")
    bf16 = EncoderEngine.from_model(full, reference_pipe.tokenizer)
    fp8 = EncoderEngine.from_model(full, reference_pipe.tokenizer, precision="fp8")
    cosine = torch.nn.functional.cosine_similarity(
        fp8.encode(PROMPTS).float().flatten(1), bf16.encode(PROMPTS).float().flatten(1)
    )
    assert (cosine > 0.9).all()


def test_fp8_on_an_unsupported_device_is_a_clear_error(reference_pipe, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("Now _scaled_mm only supports per-tensor scaling for CPU backend.")

    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    with pytest.raises(ValueError, match=r"precision fp8: torch .* cannot run row-wise fp8 matmuls on cpu"):
        EncoderEngine.from_model(reference_pipe.text_encoder, reference_pipe.tokenizer, precision="fp8")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture: needs CUDA")
def test_cuda_graphs_give_the_bytes_of_the_eager_forward_and_pipelined_launches_stay_apart(reference_pipe):
    import copy

    full = copy.deepcopy(reference_pipe.text_encoder).to("cuda")
    eager = EncoderEngine.from_model(full, reference_pipe.tokenizer)
    # What a 5-prompt batch runs as in the 8 bucket: the five prompts and three copies of the first.
    want = eager.encode(PROMPTS + [PROMPTS[0]] * 3)[:5]
    graphs = EncoderEngine.from_model(full, reference_pipe.tokenizer)
    assert graphs.capture_cuda_graphs([2, 4, 8]) == (2, 4, 8)
    assert torch.equal(graphs.encode(PROMPTS), want)
    assert graphs.batch_sizes[8] == 1
    # Two batches in flight on the device: the second replay overwrites the static output only after the
    # first one's copy to the host (stream order), so each handle holds its own rows.
    first, second = graphs.launch(PROMPTS[:4]), graphs.launch(PROMPTS[1:5])
    assert torch.equal(second.result(), eager.encode(PROMPTS[1:5]))
    assert torch.equal(first.result(), eager.encode(PROMPTS[:4]))
    with pytest.raises(ValueError, match="at least 2"):
        graphs.capture_cuda_graphs([1, 4])


def test_cuda_graphs_on_the_cpu_are_a_clear_error(reference_pipe):
    engine = EncoderEngine.from_model(reference_pipe.text_encoder, reference_pipe.tokenizer)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device; this engine runs on cpu"):
        engine.capture_cuda_graphs([2, 4])


def test_reproducible_mode_always_masks_so_full_length_prompts_run_one_attention_kernel(reference_pipe, monkeypatch):
    """A batch in which every prompt fills max_length has nothing padded; transformers would then drop the
    mask and take sdpa's is_causal kernel, other bits on an H100 than the masked kernel the same prompt
    gets next to a shorter one. Reproducible mode always passes the mask; dynamic mode keeps the drop."""
    from flux2_encoder_server.cuda_graphs import HostMaskBuilder

    engine = EncoderEngine.from_model(reference_pipe.text_encoder, reference_pipe.tokenizer)
    builder = HostMaskBuilder(engine.decoder, torch.bfloat16)
    full = torch.ones((2, 512), dtype=torch.long)
    padded = full.clone()
    padded[1, 300:] = 0
    causal = torch.ones((512, 512), dtype=torch.bool).tril()
    assert builder(full) is None
    assert torch.equal(builder(full, always=True), causal.expand(2, 1, 512, 512))
    assert torch.equal(builder(padded), builder(padded, always=True))
    assert torch.equal(builder(padded), causal & padded.bool()[:, None, None, :])
    # transformers releases without `allow_is_causal_skip`: the builder makes the same mask itself.
    monkeypatch.setattr(builder, "_params", builder._params - {"allow_is_causal_skip"})
    assert torch.equal(builder(full, always=True), causal.expand(2, 1, 512, 512))

    seen: list[torch.Tensor | None] = []
    for mode in BATCHING_MODES:
        eng = EncoderEngine.from_model(reference_pipe.text_encoder, reference_pipe.tokenizer, batching_mode=mode)
        # The mask the decoder is called with (the engine's decoder is its own view: the hook stays on it).
        eng.decoder.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True
        )
        long_prompt = "un café à Paris " * 200  # truncated to 512 tokens: nothing padded
        assert bool(eng.tokenize([long_prompt])["attention_mask"].all())
        eng.forward(**eng.tokenize([long_prompt]))
    assert seen[0].shape == (2, 1, 512, 512)  # reproducible: the 4D mask
    assert seen[1].shape == (1, 512)  # dynamic: the 2D mask, as diffusers passes it
