"""The single-machine mode (issue 11): the encoder server and the DiT on one card, the DiT planned within
what the server leaves. The end-to-end demo on tiny models with a 4-bit encoder runs in
`test_generation.py::test_demo_command_runs`; the card itself is a GPU's (`demo --model` refuses to start
without one), so here: the budget arithmetic against the planner, and the command line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from flux2_client.demo import SharedCard
from flux2_client.planner import Budget, GiB, PlanError, Workload, plan_memory, spec_from_config

SPEC = spec_from_config({}, vae_bytes=170 << 20)  # FLUX.2-dev's DiT


def test_the_dit_gets_what_the_encoder_leaves_of_the_budget():
    card = SharedCard(budget=24 * GiB, encoder_bytes=int(10.5 * GiB))
    assert card.dit_vram() == int(13.5 * GiB)
    assert "the encoder server holds 10.50 GiB" in card.describe() and "within 13.50 GiB" in card.describe()
    # No budget: the planner reads the free memory when it plans, after the server took its share.
    assert SharedCard(budget=None, encoder_bytes=10 * GiB).dit_vram() is None
    with pytest.raises(PlanError, match="used up by the encoder server alone"):
        SharedCard(budget=8 * GiB, encoder_bytes=9 * GiB).dit_vram()


@pytest.mark.parametrize(
    ("card_gib", "encoder_gib", "fits"),
    [
        # Encoder footprints: weights of docs/benchmarks.md's tiers + ~1.5 GiB of context and activations.
        (16, 9.3 + 1.5, True),  # nf4 beside the DiT on a 16 GB card
        (24, 16.8 + 1.5, True),  # int8 on a 24 GB card
        (16, 16.8 + 1.5, False),  # int8 does not leave a 16 GB card room for any plan
        (24, 32.3 + 1.5, False),  # bf16 needs more than a 24 GB card on its own
    ],
)
def test_planner_counts_the_encoder_on_the_same_card(card_gib, encoder_gib, fits):
    card = SharedCard(budget=card_gib * GiB, encoder_bytes=int(encoder_gib * GiB))
    try:
        vram = card.dit_vram()
        assert vram is not None
        plan = plan_memory(SPEC, Workload(1024, 1024), Budget(vram=vram))
    except PlanError:
        assert not fits
        return
    assert fits
    # The plan keeps the whole DiT process (context included) inside what the encoder left.
    assert plan.budget.vram + card.encoder_bytes == card_gib * GiB
    assert plan.device_weight_bytes + plan.activation_bytes < plan.allocator_limit


def _demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flux2_client", "demo", *args], capture_output=True, text=True, timeout=120
    )


def test_demo_arguments_are_checked_before_anything_starts(tmp_path):
    proc = _demo("--workdir", str(tmp_path), "--encoder-precision", "int4")
    assert proc.returncode == 2 and "invalid choice: 'int4'" in proc.stderr
    proc = _demo("--workdir", str(tmp_path), "--vram", "lots")
    assert proc.returncode != 0 and "--vram: size: expected a number" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_demo_with_real_weights_needs_a_gpu(tmp_path):
    proc = _demo("--workdir", str(tmp_path), "--model", "black-forest-labs/FLUX.2-dev", "--encoder-precision", "nf4")
    assert proc.returncode != 0 and "--model: real weights need a CUDA GPU" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "server.log").exists()


def test_demo_family_picks_the_tiny_models_only(tmp_path, capsys):
    from flux2_client.cli import main

    argv = ["demo", "--workdir", str(tmp_path), "--family", "klein", "--model", "black-forest-labs/FLUX.2-dev"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--family picks the tiny models" in err[0]
    assert not (tmp_path / "server.log").exists()
