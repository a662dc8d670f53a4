"""What a generation adds to the base model, on the CPU: the FLUX.2-dev Turbo recipe is the model card's
call, `--lora`/`--turbo`/`--cache` reach the pipeline, and the PNGs and the plan output name every LoRA
(file, sha256 prefix, scale), the sigmas, the step cache and turbo."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
from flux2_client.cli import main
from flux2_client.generation import GenerationParams, generate, generate_to_files
from flux2_client.lora import LoraSourceError, LoraSpec, lora_file
from flux2_client.turbo import TURBO_GUIDANCE, TURBO_SIGMAS, TURBO_STEPS, turbo_params
from PIL import Image
from test_generation import _FixedEncoder
from test_lora import random_lora
from test_offload import embeddings

# The model card of fal/FLUX.2-dev-Turbo calls Flux2Pipeline with exactly these (README "Usage").
CARD_SIGMAS = [1.0, 0.6509, 0.4374, 0.2932, 0.1893, 0.1108, 0.0495, 0.00031]


@pytest.fixture(scope="module")
def small_lora(tiny, tmp_path_factory) -> str:
    """A rank-4 LoRA with random A and B on the tiny DiT's attention projections."""
    folder = tmp_path_factory.mktemp("small_lora")
    random_lora(tiny, folder, ["to_q", "to_k", "to_v"], rank=4, alpha=4, seed=2)
    return str(folder / "pytorch_lora_weights.safetensors")


def test_turbo_is_the_model_cards_call(streamed_pipe, resident_nf4_pipe):
    """`turbo_params` on the streamed client gives the latents of the card's `pipe(sigmas=TURBO_SIGMAS,
    guidance_scale=2.5, num_inference_steps=8)` on diffusers' resident NF4 pipeline."""
    assert list(TURBO_SIGMAS) == CARD_SIGMAS and TURBO_STEPS == 8 and TURBO_GUIDANCE == 2.5
    params = turbo_params(GenerationParams(height=64, width=64, seed=4))
    ours = generate(streamed_pipe, embeddings(1), params, progress=False, output_type="latent")[0]
    theirs = resident_nf4_pipe(
        prompt_embeds=embeddings(1),
        sigmas=CARD_SIGMAS,
        guidance_scale=2.5,
        height=64,
        width=64,
        num_inference_steps=8,
        generator=torch.Generator("cpu").manual_seed(4),
        output_type="latent",
    ).images[0]
    assert torch.equal(ours, theirs)
    with pytest.raises(ValueError, match="sigmas: 8 values for 4 steps"):
        generate(streamed_pipe, embeddings(1), dataclasses.replace(params, num_inference_steps=4), progress=False)


def test_pngs_name_loras_sigmas_cache_and_turbo(tiny, small_lora, tmp_path, monkeypatch):
    """generate_to_files with a LoRA at scale 0.5, turbo (its LoRA swapped for a local one: no network here)
    and MagCache: 8 steps on the card's sigmas, and the PNG says so."""
    import flux2_client.turbo

    turbo_file = tmp_path / "turbo" / "flux.2-turbo-lora.safetensors"
    turbo_file.parent.mkdir()
    turbo_file.write_bytes(Path(small_lora).read_bytes())
    monkeypatch.setattr(flux2_client.turbo, "TURBO_LORA", LoraSpec(str(turbo_file.parent), 1.0, turbo_file.name))
    encoder = _FixedEncoder(torch.randn(1, 512, 192, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16))
    params = GenerationParams(height=32, width=32, guidance_scale=3.0, seed=5, step_cache="mag")
    [path] = generate_to_files(
        encoder,
        "a fox",
        tmp_path / "fox.png",
        params,
        model=str(tiny.pipeline),
        dit=str(tiny.nf4_repo),
        device="cpu",
        progress=False,
        loras=[f"{small_lora}:0.5"],
        turbo=True,
    )
    with Image.open(path) as image:
        meta = json.loads(image.text["flux2_split"])
    digest = hashlib.sha256(Path(small_lora).read_bytes()).hexdigest()[:12]
    assert json.loads(meta["loras"]) == [
        {"source": small_lora, "file": "pytorch_lora_weights.safetensors", "sha256": digest, "scale": 0.5},
        {"source": str(turbo_file.parent), "file": turbo_file.name, "sha256": digest, "scale": 1.0},
    ]
    assert meta["steps"] == 8 and json.loads(meta["sigmas"]) == CARD_SIGMAS and meta["guidance"] == 3.0
    assert meta["step_cache"] == "mag" and meta["turbo"] == "fal/FLUX.2-dev-Turbo"


def test_plan_only_names_and_counts_the_loras_and_the_cache(small_lora, tmp_path, capsys):
    from safetensors.torch import load_file

    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "Flux2Transformer2DModel"}))
    base = ["generate", "--plan-only", "--vram", "8GB", "--dit", str(tmp_path)]
    assert main([*base, "--lora", f"{small_lora}:0.5", "--cache", "mag"]) == 0
    out = capsys.readouterr().out
    digest = hashlib.sha256(Path(small_lora).read_bytes()).hexdigest()[:12]
    assert f"LoRA            pytorch_lora_weights.safetensors (sha256 {digest}), scale 0.5" in out
    assert "step cache      mag" in out
    nbytes = sum(t.numel() * t.element_size() for t in load_file(small_lora).values())
    assert "LoRA adapters" in out and nbytes > 0  # counted in the plan, from the file's header
    assert main(base) == 0
    assert "LoRA" not in capsys.readouterr().out


def test_cli_refuses_bad_recipes_naming_the_flag(tmp_path, capsys):
    klein = tmp_path / "klein"
    klein.mkdir()
    (klein / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline"}))
    dit = tmp_path / "dit"
    (dit / "transformer").mkdir(parents=True)
    (dit / "transformer" / "config.json").write_text(json.dumps({"_class_name": "Flux2Transformer2DModel"}))
    plan = ["generate", "--plan-only", "--vram", "8GB"]
    cases = {
        "--lora: expected PATH_OR_REPO[:SCALE]": [*plan, "--lora", ""],
        "--steps: --turbo runs the 8 steps of its sigmas, got 20": [*plan, "--turbo", "--steps", "20"],
        "--turbo: the fal/FLUX.2-dev-Turbo LoRA is for FLUX.2-dev, not FLUX.2 [klein]": [
            *plan,
            "--turbo",
            "--model",
            str(klein),
        ],
        f"--lora {tmp_path}/missing.safetensors: no such file or folder": [
            *plan,
            "--dit",
            str(dit),
            "--lora",
            f"{tmp_path}/missing.safetensors",
        ],
    }
    for message, argv in cases.items():
        code = main(argv)
        err = capsys.readouterr().err.strip()
        # The CLI's edge: one line on stderr naming the flag, the usage exit code.
        assert code == 2 and len(err.splitlines()) == 1 and message in err, (code, err)


def test_a_lora_source_names_one_file(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"")
    assert lora_file(LoraSpec(str(tmp_path))) == str(tmp_path / "a.safetensors")
    (tmp_path / "b.safetensors").write_bytes(b"")
    with pytest.raises(
        LoraSourceError, match=r"2 \.safetensors files, name one of .*/a\.safetensors, .*/b\.safetensors"
    ):
        lora_file(LoraSpec(str(tmp_path)))
    assert lora_file(LoraSpec(str(tmp_path), weight_name="b.safetensors")) == str(tmp_path / "b.safetensors")
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert lora_file(LoraSpec(str(tmp_path))).endswith("pytorch_lora_weights.safetensors")


def test_generate_params_name_the_bad_field():
    with pytest.raises(ValueError, match="step_cache: expected one of first-block, mag, taylorseer, got 'fast'"):
        GenerationParams(step_cache="fast").check()
    turbo = turbo_params(GenerationParams(guidance_scale=4.0, seed=9))
    assert (turbo.num_inference_steps, list(turbo.sigmas), turbo.guidance_scale, turbo.seed) == (8, CARD_SIGMAS, 2.5, 9)
