"""The memory planner's decisions for the real FLUX.2-dev DiT at given budgets (arithmetic only, no
weights): what stays resident, what streams, at which granularity, the allocator cap and VAE tiling; and
its byte counts against the tensors bitsandbytes really allocates (tiny DiT). Its memory estimates
against memory measured on a GPU: tests/gpu/test_gpu_planner_memory.py."""

from __future__ import annotations

import pytest
import torch
from flux2_client.planner import (
    TENSOR_ALIGN,
    Budget,
    GiB,
    PlanError,
    Workload,
    activation_bytes,
    parse_size,
    plan_memory,
    spec_from_config,
)
from hypothesis import given, settings
from hypothesis import strategies as st

SPEC = spec_from_config({}, vae_bytes=170 << 20)  # diffusers' defaults are FLUX.2-dev's shapes
W1024 = Workload(1024, 1024)
W1024_2REFS = Workload(1024, 1024, reference_sizes=((1024, 1024), (1024, 1024)))


def plan(vram_gib: float, workload: Workload = W1024, **budget):
    return plan_memory(SPEC, workload, Budget(vram=int(vram_gib * GiB), **budget))


def test_spec_matches_the_real_model_size():
    # 8 double + 48 single blocks, NF4 with fp32 absmax: 16.9 GiB incl. scales (docs/design.md#model-shapes-and-sizes).
    assert len(SPEC.atoms) == 8 * 3 + 48
    assert 16.5 * GiB < SPEC.block_bytes + SPEC.other_bytes < 17.3 * GiB
    double_quant = spec_from_config({}, double_quant=True)
    assert double_quant.block_bytes < SPEC.block_bytes * 0.95


def test_large_budget_keeps_everything_resident():
    p = plan(24)
    assert p.mode == "resident" and p.num_slots == 0 and p.host_pinned_bytes == 0
    assert all(u.resident for u in p.units)
    assert not p.vae_tiled  # room for the untiled (faster) decode


def test_8gib_streams_whole_blocks_and_keeps_some_resident():
    p = plan(8)
    assert p.mode == "stream" and p.granularity == "block"
    resident = [i for i, u in enumerate(p.units) if u.resident]
    assert 0 < len(resident) < len(p.units)
    # Resident units are spread out, not bunched at one end, so copies can run ahead behind them.
    assert max(resident) - min(resident) > len(p.units) // 2
    assert len(p.streamed_units) % p.num_slots == 0
    assert p.vae_tiled  # 4.4 GiB untiled decode would cost blocks that matter every step
    assert p.allocator_limit == 8 * GiB - p.budget.overhead
    assert p.host_pinned_bytes == sum(u.nbytes for u in p.streamed_units)


def test_reference_images_cost_resident_blocks():
    plain, refs = plan(8), plan(8, W1024_2REFS)
    assert refs.activation_bytes > 2 * plain.activation_bytes
    assert refs.resident_bytes < plain.resident_bytes


def test_tight_budget_falls_back_to_per_part_transfers():
    p = plan(4, overhead=int(0.75 * GiB))
    assert p.mode == "stream" and p.granularity == "part"
    assert p.slot_bytes < plan(8).slot_bytes


def test_too_small_budget_says_what_it_needs():
    with pytest.raises(PlanError, match=r"vram budget 3\.00 GiB is too small .* needs"):
        plan(3)
    with pytest.raises(PlanError, match="host RAM"):
        plan(8, host_available=4 * GiB)


def test_bigger_workloads_never_need_less_activation_memory():
    sizes = [Workload(512, 512), W1024, Workload(1024, 1024, batch=2), W1024_2REFS]
    values = [activation_bytes(SPEC, w) for w in sizes]
    assert values == sorted(values)


@settings(max_examples=60, deadline=None)
@given(
    vram=st.floats(min_value=4.5, max_value=40),
    refs=st.integers(min_value=0, max_value=3),
    side=st.sampled_from([512, 768, 1024]),
)
def test_plan_covers_every_block_once_in_order(vram, refs, side):
    workload = Workload(side, side, reference_sizes=((1024, 1024),) * refs)
    try:
        p = plan(vram, workload)
    except PlanError:
        return
    # Every block is either resident or streamed, exactly once, in execution order.
    names = [a for u in p.units for a in u.atoms]
    assert names == [a.name for a in SPEC.atoms]
    assert p.allocator_limit == p.budget.vram - p.budget.overhead
    if p.mode == "stream":
        # Unit i always lands in slot i mod K: the streamed count is a multiple of K, every slot fits any unit.
        assert len(p.streamed_units) % p.num_slots == 0
        assert p.slot_bytes >= max(u.nbytes for u in p.streamed_units)
        assert p.host_pinned_bytes == sum(u.nbytes for u in p.streamed_units)


def _allocated_tensors(model) -> list:
    """Every tensor a quantized DiT holds, gathered here independently of the client's introspection:
    parameters, buffers, and each NF4 weight's quant_state tensors (nested state included)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        while state is not None:
            for t in (state.absmax, state.code, getattr(state, "offset", None)):
                if isinstance(t, torch.Tensor):
                    tensors[id(t)] = t
            state = getattr(state, "state2", None)
    return list(tensors.values())


@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4-double-quant"])
def test_config_byte_counts_match_what_bitsandbytes_allocates(tiny, double_quant):
    """`spec_from_config` is what `--plan-only` plans FLUX.2-dev with before anything is downloaded:
    arithmetic on the config. Checked here against a DiT bitsandbytes really quantized (the tiny one,
    pre-quantized from disk, or quantized on load with double quantization)."""
    from flux2_client._quantization import load_nf4_transformer
    from flux2_client.offload import spec_from_module

    repo = str(tiny.pipeline if double_quant else tiny.nf4_repo)
    model = load_nf4_transformer(repo, device="cpu", double_quant=double_quant)
    estimated = spec_from_config(dict(model.config), double_quant=double_quant)
    measured = spec_from_module(model)
    assert [(a.name, a.nbytes) for a in estimated.atoms] == [(a.name, a.nbytes) for a in measured.atoms]
    assert estimated.other_bytes == measured.other_bytes
    assert estimated.largest_dequantized_bytes == measured.largest_dequantized_bytes
    assert (estimated.hidden, estimated.mlp_hidden) == (measured.hidden, measured.mlp_hidden)
    # The slab estimate is the allocated bytes plus at most one alignment pad per tensor.
    tensors = _allocated_tensors(model)
    allocated = sum(t.numel() * t.element_size() for t in tensors)
    total = estimated.block_bytes + estimated.other_bytes
    assert allocated <= total < allocated + TENSOR_ALIGN * len(tensors)


@pytest.mark.parametrize(
    ("text", "value"),
    [("8GB", 8 * GiB), ("8GiB", 8 * GiB), ("7.5G", int(7.5 * GiB)), ("6000MB", 6000 << 20), ("8", 8 * GiB)],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_rejects_garbage():
    with pytest.raises(ValueError, match="size"):
        parse_size("eight gigs")
