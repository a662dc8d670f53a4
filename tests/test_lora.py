"""LoRAs on the client's NF4 DiT, on the CPU: the planner's streamed path with LoRAs loaded by
`load_pipeline(loras=...)` gives images bit-identical to diffusers' resident NF4 pipeline with the same LoRAs
loaded by `load_lora_weights` (one LoRA, two with scales, switching between calls), the adapters stay
resident while the base blocks stream and the plan counts them, and a LoRA whose keys match no module is
an error. The cause of the pixel drift of issue 12 — bitsandbytes' CPU repack undone, lossily and in place,
by the `state_dict()` that diffusers' LoRA loader calls — has its regression test here."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from conftest import diffusers_nf4_transformer, streaming_budget
from flux2_client._quantization import keep_canonical_nf4_layout, load_nf4_transformer
from flux2_client.generation import generate, load_pipeline
from flux2_client.lora import LoraKeyError, LoraSpec, load_loras, lora_module_paths
from flux2_client.offload import get_block_streamer, get_memory_plan, spec_from_module
from flux2_client.planner import Budget, GiB, Workload, activation_bytes, align_bytes, plan_memory, spec_from_config
from test_offload import PARAMS, diffusers_images, embeddings

WORKLOAD = Workload(64, 64)
TRAINER_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # train_dreambooth_lora_flux2.py's default --lora_layers


def train_lora_like_the_trainer(tiny, out_dir, steps: int = 3) -> str:
    """What `train_dreambooth_lora_flux2.py` writes, on the tiny DiT: its LoraConfig defaults (rank 4, alpha 4,
    gaussian init) on its default targets, a few AdamW steps of its flow-matching loss (bf16 weights, as with
    --mixed_precision bf16), saved by its save hook: `get_peft_model_state_dict` + `Flux2Pipeline.
    save_lora_weights` with the adapter's config as metadata."""
    from diffusers import Flux2Pipeline, Flux2Transformer2DModel
    from diffusers.training_utils import _collate_lora_metadata
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel.from_pretrained(str(tiny.pipeline), subfolder="transformer")
    transformer.to(dtype=torch.bfloat16).requires_grad_(False)
    config = LoraConfig(
        r=4, lora_alpha=4, lora_dropout=0.0, init_lora_weights="gaussian", target_modules=TRAINER_TARGETS
    )
    transformer.add_adapter(config)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    latents = torch.randn(1, 128, 4, 4).to(torch.bfloat16)
    img_ids = Flux2Pipeline._prepare_latent_ids(latents)
    packed = latents.flatten(2).transpose(1, 2)
    embeds = torch.randn(1, 8, 192).to(torch.bfloat16)
    txt_ids = Flux2Pipeline._prepare_text_ids(embeds)
    for _ in range(steps):
        noise = torch.randn_like(packed)
        sigma = torch.rand(1)
        noisy = ((1 - sigma) * packed + sigma * noise).to(torch.bfloat16)
        pred = transformer(
            hidden_states=noisy,
            timestep=sigma,
            guidance=torch.tensor([4.0]),
            encoder_hidden_states=embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        loss = torch.nn.functional.mse_loss(pred.float(), (noise - packed).float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    Flux2Pipeline.save_lora_weights(
        str(out_dir),
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        **_collate_lora_metadata({"transformer": transformer}),
    )
    return str(out_dir)


def random_lora(tiny, out_dir, targets: list[str], rank: int, alpha: int, seed: int) -> str:
    """A LoRA with random A and B (nonzero effect), saved by `Flux2Pipeline.save_lora_weights`."""
    from diffusers import Flux2Pipeline, Flux2Transformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel.from_pretrained(str(tiny.pipeline), subfolder="transformer")
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=targets))
    layers = {k: v.to(torch.bfloat16) for k, v in get_peft_model_state_dict(transformer).items()}
    metadata = transformer.peft_config["default"].to_dict()
    Flux2Pipeline.save_lora_weights(
        str(out_dir), transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata
    )
    return str(out_dir)


@pytest.fixture(scope="module")
def trainer_lora(tiny, tmp_path_factory) -> str:
    return train_lora_like_the_trainer(tiny, tmp_path_factory.mktemp("trainer_lora"))


@pytest.fixture(scope="module")
def wide_lora(tiny, tmp_path_factory) -> str:
    """Rank 8, alpha 16, on the layers the trainer's default leaves out (single blocks, feed-forwards)."""
    targets = ["to_qkv_mlp_proj", "linear_in", "linear_out", "add_q_proj", "to_add_out"]
    return random_lora(tiny, tmp_path_factory.mktemp("wide_lora"), targets, rank=8, alpha=16, seed=1)


@pytest.fixture(scope="module")
def reference(tiny, trainer_lora, wide_lora):
    """diffusers' resident NF4 pipeline, its image without LoRA, then both LoRAs loaded by `load_lora_weights`
    (adapters "trainer" and "wide")."""
    from diffusers import Flux2Pipeline

    pipe = Flux2Pipeline.from_pretrained(
        str(tiny.pipeline),
        transformer=diffusers_nf4_transformer(tiny),
        text_encoder=None,
        tokenizer=None,
        dtype=torch.bfloat16,
    )
    no_lora = diffusers_images(pipe, embeddings(1))[0]
    pipe.load_lora_weights(trainer_lora, adapter_name="trainer")
    pipe.load_lora_weights(wide_lora, adapter_name="wide")
    return pipe, np.asarray(no_lora)


def lora_file_bytes(*folders: str) -> int:
    from safetensors.torch import load_file

    tensors = [t for f in folders for t in load_file(f"{f}/pytorch_lora_weights.safetensors").values()]
    return sum(align_bytes(t.numel() * t.element_size()) for t in tensors)


@pytest.fixture(scope="module")
def streamed(tiny, trainer_lora, wide_lora):
    """The client's planner path on the CPU with both LoRAs (adapters lora_0 = trainer, lora_1 = wide), under
    a budget that leaves room for the adapters, 2.5 blocks and no more."""
    return load_pipeline(
        str(tiny.pipeline),
        dit=str(tiny.nf4_repo),
        device="cpu",
        offload="plan",
        vram=streaming_budget(tiny, WORKLOAD, extra_resident=lora_file_bytes(trainer_lora, wide_lora)),
        workload=WORKLOAD,
        loras=[(trainer_lora, 1.0), LoraSpec(wide_lora, 1.0)],
    )


def ours(pipe, adapters: dict[str, float]) -> np.ndarray:
    pipe.set_adapters(list(adapters), adapter_weights=list(adapters.values()))
    return np.asarray(generate(pipe, embeddings(1), PARAMS, progress=False)[0])


_reference_images: dict[tuple[int, tuple[tuple[str, float], ...]], np.ndarray] = {}


def theirs(pipe, adapters: dict[str, float]) -> np.ndarray:
    """diffusers' image for these adapter weights (each computed once per reference pipeline)."""
    key = (id(pipe), tuple(adapters.items()))
    if key not in _reference_images:
        pipe.set_adapters(list(adapters), adapter_weights=list(adapters.values()))
        _reference_images[key] = np.asarray(diffusers_images(pipe, embeddings(1))[0])
    return _reference_images[key]


def test_trainer_lora_is_in_the_trainers_format(trainer_lora):
    from safetensors import safe_open

    path = f"{trainer_lora}/pytorch_lora_weights.safetensors"
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
        b = f.get_tensor("transformer.transformer_blocks.0.attn.to_q.lora_B.weight")
    modules = {f"transformer.transformer_blocks.{i}.attn.{t}" for i in range(2) for t in TRAINER_TARGETS}
    assert set(lora_module_paths(dict.fromkeys(keys))) == modules
    assert keys == {f"{m}.lora_{ab}.weight" for m in modules for ab in "AB"}
    assert metadata["transformer.r"] == 4 and metadata["transformer.lora_alpha"] == 4
    assert b.abs().max() > 0  # trained: B starts at zero


def test_plan_keeps_lora_weights_resident_and_counts_them(tiny, streamed):
    plan, streamer = get_memory_plan(streamed), get_block_streamer(streamed)
    assert plan.mode == "stream" and plan.streamed_units and any(u.resident for u in plan.units)
    lora = [(n, p) for n, p in streamed.transformer.named_parameters() if ".lora_" in n]
    assert {n.split(".")[-2] for n, _ in lora} == {"lora_0", "lora_1"}
    assert plan.spec_adapter_bytes == sum(align_bytes(p.numel() * p.element_size()) for _, p in lora) > 0
    assert "LoRA adapters" in plan.describe() and plan.as_dict()["adapter_bytes"] == plan.spec_adapter_bytes
    # Every adapter weight views the resident buffer; the slots and the host buffer hold base weights only,
    # exactly the bytes of the same DiT without LoRA.
    lo, hi = streamer.resident_buffer.data_ptr(), streamer.resident_buffer.data_ptr() + streamer.resident_buffer.numel()
    assert all(lo <= p.data_ptr() < hi for _, p in lora)
    assert streamer.resident_buffer.numel() == plan.resident_bytes
    bare = {a.name: a.nbytes for a in spec_from_module(load_nf4_transformer(str(tiny.nf4_repo), device="cpu")).atoms}
    assert streamer.host_buffer.numel() == sum(bare[a] for u in plan.streamed_units for a in u.atoms)


def test_one_lora_and_switching_between_calls_identical_to_diffusers(streamed, reference):
    pipe, no_lora = reference
    trainer = theirs(pipe, {"trainer": 1.0})
    wide = theirs(pipe, {"wide": 1.0})
    streamer = get_block_streamer(streamed)
    first = ours(streamed, {"lora_0": 1.0})
    np.testing.assert_array_equal(first, trainer)
    assert not np.array_equal(first, no_lora)  # the trained LoRA changes the image
    np.testing.assert_array_equal(ours(streamed, {"lora_1": 1.0}), wide)
    np.testing.assert_array_equal(ours(streamed, {"lora_0": 1.0}), trainer)  # and back, same bytes
    assert get_block_streamer(streamed) is streamer  # switched without reloading or re-laying out the DiT


def test_two_loras_with_scales_identical_to_diffusers(streamed, reference):
    pipe, _ = reference
    want = theirs(pipe, {"trainer": 0.7, "wide": -0.4})
    got = ours(streamed, {"lora_0": 0.7, "lora_1": -0.4})
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, theirs(pipe, {"trainer": 0.7}))


def test_zero_scale_loras_change_nothing(streamed, reference):
    _, no_lora = reference
    np.testing.assert_array_equal(ours(streamed, {"lora_0": 0.0, "lora_1": 0.0}), no_lora)


def test_unmatched_keys_are_an_error_naming_them(tiny, reference, trainer_lora, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(f"{trainer_lora}/pytorch_lora_weights.safetensors")
    a, b = torch.zeros(4, 64, dtype=torch.bfloat16), torch.zeros(64, 4, dtype=torch.bfloat16)
    state["transformer.transformer_blocks.7.attn.to_q.lora_A.weight"] = a  # the tiny DiT has 2 double blocks
    state["transformer.transformer_blocks.7.attn.to_q.lora_B.weight"] = b
    state["text_encoder.layers.0.q_proj.lora_A.weight"] = a.clone()  # not the DiT's
    save_file(state, str(tmp_path / "pytorch_lora_weights.safetensors"))
    pipe, _ = reference
    adapters = set(pipe.transformer.peft_config)
    with pytest.raises(LoraKeyError) as err:
        load_loras(pipe, [(str(tmp_path), 1.0)])
    message = str(err.value)
    assert "3 of 19 keys match no module of the Flux2Transformer2DModel" in message
    assert "transformer.transformer_blocks.7.attn.to_q.lora_A.weight" in message
    assert "text_encoder.layers.0.q_proj.lora_A.weight" in message
    assert set(pipe.transformer.peft_config) == adapters  # nothing was loaded
    # Why the check: diffusers itself loads the keys that match and only logs the others.
    bare = load_nf4_transformer(str(tiny.nf4_repo), device="cpu")
    bare.load_lora_adapter(str(tmp_path), adapter_name="probe", use_safetensors=True)
    assert bare.peft_config["probe"].target_modules


def test_planner_makes_room_for_resident_adapters():
    """Arithmetic on the real FLUX.2-dev shapes: rank-64 bf16 adapters on the trainer's default targets and
    the single blocks' fused projections cost resident blocks at 8 GiB, never the allocator cap."""
    spec = spec_from_config({}, vae_bytes=170 << 20)
    d, f, r = spec.hidden, spec.mlp_hidden, 64
    adapter = 8 * 4 * r * (d + d) * 2 + 48 * r * (d + 3 * d + 2 * f) * 2
    lora = dataclasses.replace(spec, adapter_bytes=adapter, adapter_out_features=3 * d + 2 * f)
    budget, w = Budget(vram=8 * GiB), Workload(1024, 1024)
    plain, with_lora = plan_memory(spec, w, budget), plan_memory(lora, w, budget)
    assert with_lora.spec_adapter_bytes == adapter and with_lora.mode == "stream"
    assert with_lora.resident_bytes - adapter < plain.resident_bytes  # blocks made room for the adapters
    assert activation_bytes(lora, w) >= activation_bytes(spec, w)
    for p in (plain, with_lora):
        work = max(p.activation_bytes, p.vae_decode_bytes)
        assert p.device_weight_bytes + spec.vae_bytes + work <= p.allocator_limit
    assert "LoRA adapters" in with_lora.describe() and "LoRA adapters" not in plain.describe()


def test_lora_spec_parse():
    assert LoraSpec.parse("out/pytorch_lora_weights.safetensors:0.8") == LoraSpec(
        "out/pytorch_lora_weights.safetensors", 0.8
    )
    assert LoraSpec.parse("fal/FLUX.2-dev-Turbo") == LoraSpec("fal/FLUX.2-dev-Turbo", 1.0)
    assert LoraSpec.parse("C:\\loras\\a.safetensors") == LoraSpec("C:\\loras\\a.safetensors", 1.0)
    assert LoraSpec.of(("x", -1)) == LoraSpec("x", -1.0)
    with pytest.raises(ValueError, match="lora: expected PATH_OR_REPO"):
        LoraSpec.parse("")


# --- the cause of issue 12's pixel drift ----------------------------------------------------------------


def _packed_gemv_4bit(A, B, shapeB, absmax, code, blocksize):
    """bitsandbytes' CPU `gemv_4bit` on the avx512_bf16 layout (what `_convert_weight_packed_for_cpu`
    writes: per 32 output rows, the low and high nibbles of 32 pairs of input columns; absmax transposed),
    read back in plain torch, for CPUs whose bitsandbytes build registers no such kernel."""
    n, k = shapeB
    packed = B.view(torch.uint8).reshape(-1, 32)
    nibbles = torch.cat([packed & 0xF, packed >> 4], dim=-1)
    codes = nibbles.reshape(n // 32, k // 2, 32, 2).transpose(1, 2).reshape(n, k).long()
    scale = absmax.float().reshape(k // blocksize, n).T.repeat_interleave(blocksize, dim=1)
    weight = (code.float()[codes] * scale).to(torch.bfloat16)
    return torch.nn.functional.linear(A.to(torch.bfloat16), weight).to(A.dtype)


@pytest.fixture
def repacking_cpu(monkeypatch) -> Iterator[None]:
    """Linear4bit layers built from now on behave as on an avx512_bf16 CPU: bitsandbytes 0.50 repacks their
    NF4 weights in the first CPU forward (`support_avx512bf16_for_cpu`) and computes on that layout, and
    `Module.state_dict()` undoes it in place, lossily. Where the machine has no such CPU the packed kernel is
    supplied for the test's duration, so a regression shows as the issue's pixel drift on any CPU."""
    import bitsandbytes.nn.modules
    from bitsandbytes.functional import has_avx512bf16

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    if has_avx512bf16():
        yield
        return
    library = torch.library.Library("bitsandbytes", "IMPL")
    library.impl("gemv_4bit", _packed_gemv_4bit, "CPU")
    try:
        yield
    finally:
        library._destroy()


def nf4_layers(transformer) -> list:
    from bitsandbytes.nn import Linear4bit

    return [m for m in transformer.modules() if isinstance(m, Linear4bit)]


def test_lora_after_a_forward_on_a_repacking_cpu_stays_exact(tiny, reference, trainer_lora, repacking_cpu):
    """Issue 12: a zero-effect LoRA on the streamed path changed pixels by up to 11/255. On a repacking CPU
    the streamer had repacked the NF4 weights into its slabs; diffusers' `load_lora_adapter` calls
    `transformer.state_dict()`, whose inverse repack gave every NF4 layer a new `weight.data` (off its slot,
    frozen to whatever the slot held) and left each non-nested absmax transposed, which the next forward's
    repack scrambled. The client keeps the canonical layout, so the state_dict() changes nothing."""
    pipe_ref, no_lora = reference
    pipe = load_pipeline(
        str(tiny.pipeline),
        dit=str(tiny.nf4_repo),
        device="cpu",
        offload="plan",
        vram=streaming_budget(tiny, WORKLOAD),
        workload=WORKLOAD,
    )
    first = np.asarray(generate(pipe, embeddings(1), PARAMS, progress=False)[0])
    np.testing.assert_array_equal(first, no_lora)
    load_loras(pipe, [(trainer_lora, 0.0)])  # after a forward: diffusers' load_lora_adapter calls state_dict()
    np.testing.assert_array_equal(ours(pipe, {"lora_0": 0.0}), no_lora)  # zero effect is zero effect
    np.testing.assert_array_equal(ours(pipe, {"lora_0": 1.0}), theirs(pipe_ref, {"trainer": 1.0}))
    # How: no NF4 layer may repack, and every streamed tensor still views its slot.
    assert not any(m.support_avx512bf16_for_cpu for m in nf4_layers(pipe.transformer))
    slots = [(s.data_ptr(), s.data_ptr() + s.numel()) for s in get_block_streamer(pipe).slots]
    for unit in get_memory_plan(pipe).streamed_units:
        for atom in unit.atoms:
            for m in nf4_layers(pipe.transformer.get_submodule(atom)):
                for t in (m.weight, m.weight.quant_state.absmax):
                    assert any(lo <= t.data_ptr() < hi for lo, hi in slots)


def test_resident_lora_after_a_forward_then_unloaded_on_a_repacking_cpu(tiny, reference, trainer_lora, repacking_cpu):
    """The trap of docs/design.md ("LoRA"): with bitsandbytes' CPU repack, a LoRA loaded after a first
    forward corrupted every later output, even after unloading. On the client's resident path it cannot."""
    pipe_ref, no_lora = reference
    pipe = load_pipeline(str(tiny.pipeline), dit=str(tiny.nf4_repo), device="cpu", offload="none")
    np.testing.assert_array_equal(np.asarray(generate(pipe, embeddings(1), PARAMS, progress=False)[0]), no_lora)
    load_loras(pipe, [(trainer_lora, 1.0)])
    np.testing.assert_array_equal(ours(pipe, {"lora_0": 1.0}), theirs(pipe_ref, {"trainer": 1.0}))
    pipe.unload_lora_weights()
    np.testing.assert_array_equal(np.asarray(generate(pipe, embeddings(1), PARAMS, progress=False)[0]), no_lora)


def test_a_dit_repacked_before_streaming_is_refused(tiny):
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    transformer = load_nf4_transformer(str(tiny.nf4_repo), device="cpu")
    layer = transformer.transformer_blocks[0].ff.linear_out
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state
    )
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.ff\.linear_out already ran a CPU forward"):
        keep_canonical_nf4_layout(transformer)
