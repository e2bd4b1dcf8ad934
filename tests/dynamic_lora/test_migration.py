"""Subspaces, stability detection, migration, bandwidth queue (hypothesis), rollback, avalanche."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import get_peft_model

from dynamic_lora_helpers import small_config, tiny_llama
from reso_hf.dynamic_lora import MigrationQueue, subspace_autocorrelation, top_subspace
from reso_hf.dynamic_lora.migration import low_rank_svd

QUIET = dict(density_coupling=0.0, vertical_resonance=False, tier_inertia={"agent": 0.0, "context": 0.0})


def test_top_subspace_from_factors_matches_the_full_svd():
    generator = torch.Generator().manual_seed(0)
    factor_b, factor_a = torch.randn(40, 6, generator=generator), torch.randn(6, 30, generator=generator)
    subspace, norm = top_subspace(factor_b, factor_a, 0.5, 3)
    u_full, s_full, _ = torch.linalg.svd(0.5 * factor_b @ factor_a)
    torch.testing.assert_close(subspace @ subspace.T, u_full[:, :3] @ u_full[:, :3].T, atol=1e-4, rtol=0)
    assert norm == pytest.approx(float(s_full.norm()), rel=1e-5)
    u, s, vh = low_rank_svd(factor_b, factor_a)
    torch.testing.assert_close(u @ torch.diag(s) @ vh, factor_b @ factor_a, atol=1e-4, rtol=1e-5)
    assert subspace_autocorrelation(subspace, subspace) == pytest.approx(1.0)


def _detection_run(planted: bool, windows: int, window: int = 100, seed: int = 0):
    """Drive the context tier with a repeating (planted) or random update each step; return submit steps."""
    model = get_peft_model(tiny_llama(), small_config(tiers=["agent", "context"], target_modules=["q_proj"],
                                                      autocorr_window=window, migration_enabled=True, **QUIET))
    tuner = model.base_model
    generator = torch.Generator().manual_seed(seed)
    layers = tuner.adapter_layers()
    planted_basis = {name: torch.linalg.qr(torch.randn(layer.out_features, 2, generator=generator))[0]
                     for name, layer in layers.items()}
    detections = []
    for step in range(1, windows * window + 1):
        with torch.no_grad():
            for name, layer in layers.items():
                factor_b = layer.dynamic_lora_B["default"]["context"]
                if planted:
                    update = planted_basis[name] @ torch.randn(2, factor_b.shape[1], generator=generator)
                else:
                    update = torch.randn(factor_b.shape, generator=generator)
                factor_b.add_(0.05 * update)
        metrics = tuner.dynamic_step(allow_missing_gradients=True)
        if metrics.get("patterns", {}).get("submitted"):
            detections.append(step)
    return detections, model.peft_config["default"]


def test_planted_repeating_pattern_is_detected_within_stable_windows():
    detections, config = _detection_run(planted=True, windows=5, window=20)
    # window 1 gives the first subspace; windows 2..(1 + stable_windows) must all agree
    assert detections and detections[0] == (1 + config.stable_windows) * config.autocorr_window


def test_random_noise_is_not_detected():
    detections, _ = _detection_run(planted=False, windows=8, window=50)
    assert detections == []


def _random_factor_model(ranks, seed=0):
    model = get_peft_model(tiny_llama(), small_config(tiers=["agent", "context"], target_modules=["q_proj"],
                                                      tier_ranks=ranks, init_weights=False, **QUIET))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "dynamic_lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def _summed_delta(layer):
    return layer.get_delta_weight("default").detach().clone()


@pytest.mark.parametrize("ranks, expect_exact", [({"agent": 2, "context": 3}, False),
                                                 ({"agent": 8, "context": 2}, None)])
def test_migration_preserves_the_function_within_the_measured_truncation_error(ranks, expect_exact):
    model = _random_factor_model(ranks)
    tuner = model.base_model
    layers = tuner.adapter_layers()
    name, layer = next(iter(layers.items()))
    if expect_exact is None:
        with torch.no_grad():  # an empty agent tier can absorb the whole rank-2 pattern: no truncation
            layer.dynamic_lora_B["default"]["agent"].zero_()
        expect_exact = True
    x = torch.randn(64, layer.in_features)
    before_out = layer(x).detach()
    before_delta = _summed_delta(layer)
    context_before = layer.tier_delta_weight("default", "context").detach().clone()
    entry = tuner.migrate(name, "context")
    after_out = layer(x).detach()
    change = _summed_delta(layer) - before_delta
    assert entry["event"] == "migration" and entry["tiers"] == ["context", "agent"]
    assert float(change.norm()) == pytest.approx(entry["truncation_error"], rel=1e-3, abs=1e-5)
    per_row = (after_out - before_out).norm(dim=1) / x.norm(dim=1)
    assert float(per_row.max()) <= entry["truncation_error"] + 1e-5
    if expect_exact:
        assert entry["truncation_error"] < 1e-5
        torch.testing.assert_close(after_out, before_out, atol=1e-5, rtol=0)
    else:
        assert entry["truncation_error"] > 1e-4  # rank 2 cannot hold rank 2 + moved rank: something is cut
    # half of the top pattern left the context tier
    assert layer.tier_delta_weight("default", "context").norm() < context_before.norm()


def test_rollback_restores_exactly():
    model = _random_factor_model({"agent": 2, "context": 3})
    tuner = model.base_model
    names = list(tuner.adapter_layers())
    snapshot_0 = {k: v.detach().clone() for k, v in tuner.tier_tensors().items()}
    tuner.migrate(names[0], "context")
    snapshot_1 = {k: v.detach().clone() for k, v in tuner.tier_tensors().items()}
    tuner.migrate(names[1], "context")
    tuner.migrate(names[0], "context")
    assert any(not torch.equal(v, snapshot_1[k]) for k, v in tuner.tier_tensors().items())
    tuner.rollback(2)
    for key, value in tuner.tier_tensors().items():
        assert torch.equal(value, snapshot_1[key]), key
    tuner.rollback(1)
    for key, value in tuner.tier_tensors().items():
        assert torch.equal(value, snapshot_0[key]), key
    events = [e["event"] for e in tuner.audit_log()]
    assert events.count("migration") == 3 and events.count("rollback") == 3
    with pytest.raises(ValueError, match="Cannot roll back 1 migrations: the ring holds 0"):
        tuner.rollback(1)


# ----- bandwidth queue ------------------------------------------------------------------------------------

request_strategy = st.tuples(
    st.integers(0, 60),  # arrival tick
    st.sampled_from(["context", "agent", "swarm"]),  # channel
    st.integers(1, 500),  # size
    st.floats(0.0, 1.0),  # priority
    st.floats(0.0, 1.0),  # criticality
    st.integers(0, 9),  # module id (duplicates merge)
)


@settings(max_examples=150, deadline=None)
@given(requests=st.lists(request_strategy, max_size=60),
       budgets=st.fixed_dictionaries({c: st.floats(0.5, 50.0) for c in ("context", "agent", "swarm")}),
       refill=st.floats(0.0, 0.95), aging=st.floats(0.0, 0.2))
def test_every_admitted_request_eventually_migrates(requests, budgets, refill, aging):
    queue = MigrationQueue(budgets=budgets, refill=refill, aging=aging, max_size=40, emergency_criticality=0.9)
    accepted, served = set(), []
    arrivals = sorted(requests, key=lambda r: r[0])
    tick, index = 0, 0
    # generous bound: the slowest channel repays a 500 debt in log(1 + 500 / cap) / log(1 / refill) ticks per request
    limit = 80 + 60 * 2000
    while tick < limit and (index < len(arrivals) or queue.depth):
        while index < len(arrivals) and arrivals[index][0] <= tick:
            _, channel, size, priority, criticality, module = arrivals[index]
            request = queue.submit(f"m{module}", channel, "slower", priority, criticality, size, tick)
            if request is not None:
                accepted.add(request.request_id)
            index += 1
        for request in queue.tick(tick):
            served.append(request.request_id)
        tick += 1
    assert queue.depth == 0, f"queue did not drain within {limit} ticks"
    assert sorted(served) == sorted(accepted)  # every accepted request exactly once
    assert len(set(served)) == len(served)


def test_queue_priority_refill_bypass_and_oversize_rules():
    queue = MigrationQueue(budgets={"context": 10.0}, refill=0.9, aging=0.0, max_size=10, emergency_criticality=0.9)
    low = queue.submit("a", "context", "agent", 0.2, 0.0, 15, tick=0)
    high = queue.submit("b", "context", "agent", 0.8, 0.0, 15, tick=0)
    assert queue.tick(0) == []  # credit 10 < 15
    assert queue.credits["context"] == pytest.approx(10.0)
    assert [r.request_id for r in queue.tick(1)] == [high.request_id]  # 0.9*10+10 = 19 >= 15, highest first
    assert queue.credits["context"] == pytest.approx(4.0)
    urgent = queue.submit("c", "context", "agent", 0.1, 0.95, 1000, tick=2)
    assert [r.request_id for r in queue.tick(2)] == [urgent.request_id]  # emergency bypass despite the size
    assert queue.credits["context"] < 0  # but it was paid for: the others wait
    huge = MigrationQueue(budgets={"context": 1.0}, refill=0.5, aging=0.0, max_size=10, emergency_criticality=0.9)
    big = huge.submit("a", "context", "agent", 0.5, 0.0, 100, tick=0)  # cap = 2: never affordable
    assert [r.request_id for r in huge.tick(0)] == [big.request_id]  # admitted alone on an idle channel
    assert low.request_id in {r.request_id for r in queue.pending}


# ----- avalanche ------------------------------------------------------------------------------------------


def _tier_output_rms(tuner, tier, x_by_module):
    total = 0.0
    for name, layer in tuner.adapter_layers().items():
        x = x_by_module[layer.in_features]
        total += float((x @ layer.tier_delta_weight("default", tier).T).pow(2).mean())
    return math.sqrt(total)


def test_avalanche_of_50_stable_patterns_is_absorbed_and_the_queue_drains():
    model = get_peft_model(tiny_llama(), small_config(target_modules="all-linear", init_weights=False,
                                                      free_decay=0.0, screened_decay=0.0, vertical_resonance=False))
    tuner = model.base_model
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "dynamic_lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    dynamics = tuner.dynamics()
    layers = tuner.adapter_layers()
    tiers = dynamics.tiers
    requests = [(name, tiers[i]) for i in range(len(tiers) - 1, 0, -1) for name in sorted(layers)][:50]
    assert len(requests) == 50
    x_by_module = {d: torch.randn(128, d, generator=generator) for d in {l.in_features for l in layers.values()}}
    rms_before = {t: _tier_output_rms(tuner, t, x_by_module) for t in tiers}
    total_before = {n: layer.get_delta_weight("default").detach().clone() for n, layer in layers.items()}
    for name, source in requests:
        layer = layers[name]
        size = layer.tier_ranks["default"][source] * (layer.in_features + layer.out_features)
        assert dynamics.queue.submit(name, source, tiers[tiers.index(source) - 1], 0.9, 0.0, size, tick=0)
    depths, tick = [], 0
    while dynamics.queue.depth and tick < 5000:
        tick += 1
        dynamics.process_queue(layers, tick)
        depths.append(dynamics.queue.depth)
    waits = [e["wait"] for e in tuner.audit_log() if e["event"] == "migration"]
    print(f"\navalanche: max depth {max(depths)}, drained after {tick} ticks, "
          f"mean wait {sum(waits) / len(waits):.1f}, max wait {max(waits)}")
    assert dynamics.queue.depth == 0 and len(waits) == 50
    # every tier's output stays within what it held plus what could flow in from the next faster tier
    rms_after = {t: _tier_output_rms(tuner, t, x_by_module) for t in tiers}
    for index, tier in enumerate(tiers[:-1]):
        inflow = 0.5 * rms_before[tiers[index + 1]]  # eta = 0.5 of at most the whole faster tier
        assert rms_after[tier] <= rms_before[tier] + inflow + 1e-4, (tier, rms_before, rms_after)
    # the summed adapter changed only by the truncation errors that were measured and logged
    errors = {}
    for entry in tuner.audit_log():
        if entry["event"] == "migration":
            errors[entry["module"]] = errors.get(entry["module"], 0.0) + entry["truncation_error"]
    for name, layer in layers.items():
        drift = float((layer.get_delta_weight("default") - total_before[name]).norm())
        assert drift <= errors.get(name, 0.0) + 1e-4
