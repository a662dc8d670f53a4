"""The memory planner's decisions for the real FLUX.2-dev DiT at given budgets (arithmetic only, no
weights): what stays resident, what streams, at which granularity, the allocator cap and VAE tiling."""

from __future__ import annotations

import pytest
from flux2_client.planner import (
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
def test_plan_stays_inside_the_budget(vram, refs, side):
    workload = Workload(side, side, reference_sizes=((1024, 1024),) * refs)
    try:
        p = plan(vram, workload)
    except PlanError:
        return
    # What the plan puts on the card never exceeds the budget.
    work = max(p.activation_bytes, p.vae_decode_bytes)
    total = p.device_weight_bytes + SPEC.vae_bytes + work + (p.budget.vram - p.allocator_limit)
    assert total <= p.budget.vram
    # Every block is either resident or streamed, exactly once, in execution order.
    names = [a for u in p.units for a in u.atoms]
    assert names == [a.name for a in SPEC.atoms]
    if p.mode == "stream":
        assert len(p.streamed_units) % p.num_slots == 0
        assert p.slot_bytes >= max(u.nbytes for u in p.streamed_units)


@pytest.mark.parametrize(
    ("text", "value"),
    [("8GB", 8 * GiB), ("8GiB", 8 * GiB), ("7.5G", int(7.5 * GiB)), ("6000MB", 6000 << 20), ("8", 8 * GiB)],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_rejects_garbage():
    with pytest.raises(ValueError, match="size"):
        parse_size("eight gigs")
