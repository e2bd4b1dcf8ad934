"""Consolidation at task boundaries, protected subspaces, importance damping, budget-scaled windows, the
per-module vertical cosines and the health criterion on migration truncation (issue 20)."""

import pytest
import torch
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from dynamic_lora_helpers import batch, small_config, tiny_llama
from reso_hf.dynamic_lora import DynamicLoraCallback
from reso_hf.dynamic_lora.callback import boundary_steps
from reso_hf.dynamic_lora.consolidation import remove_column_component, remove_row_component

ADAPTER = "default"
FAST = ["swarm", "agent", "context"]


def _deltas(tuner):
    return {name: layer.get_delta_weight(ADAPTER).detach().clone() for name, layer in tuner.adapter_layers().items()}


def _train(model, steps, lr=1e-2, seed=0):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        ids = batch(seed=seed + step, size=4, length=12)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        model.base_model.dynamic_step(optimizer)
        optimizer.zero_grad()
    return optimizer


def test_consolidate_changes_the_summed_delta_by_exactly_the_measured_truncation_error():
    model = get_peft_model(tiny_llama(), small_config(init_weights=False))
    tuner = model.base_model
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    before = _deltas(tuner)
    report = tuner.consolidate()
    after = _deltas(tuner)
    assert report["memory_tiers"] == ["foundation", "domain"] and report["fast_tiers"] == FAST
    for name in before:
        change = float((before[name] - after[name]).norm())
        module = report["per_module"][name]
        assert change == pytest.approx(module["truncation_error"], rel=1e-3, abs=1e-5)
        assert module["relative_truncation_error"] == pytest.approx(change / float(before[name].norm()), rel=1e-3)
        assert module["truncation_error"] > 1e-3  # rank 20 of random factors squeezed into rank 12
    total = sum(float((before[n] - after[n]).norm()) ** 2 for n in before) ** 0.5
    assert report["truncation_error"] == pytest.approx(total, rel=1e-3)
    for name, layer in tuner.adapter_layers().items():
        for tier in FAST:  # re-initialised: no change, fresh non-zero A
            assert float(layer.dynamic_lora_B[ADAPTER][tier].detach().abs().max()) == 0.0
            assert float(layer.dynamic_lora_A[ADAPTER][tier].detach().abs().max()) > 0.0
    for name, param in model.named_parameters():  # the base weights are not touched
        if "base_layer" in name:
            assert torch.equal(param, base_before[name])
    assert tuner.dynamics().counters["consolidations"] == 1
    assert tuner.audit_log()[-1]["event"] == "consolidation"


def test_consolidate_refuses_a_merged_adapter_and_resets_the_optimizer_state():
    model = get_peft_model(tiny_llama(), small_config(init_weights=False))
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"merged into the base weights of 4 modules .* call unmerge_adapter\(\) first"):
        model.base_model.consolidate()
    model.unmerge_adapter()
    optimizer = _train(model, 1)
    assert len(optimizer.state) == 40  # 4 modules x 5 tiers x (A, B)
    report = model.base_model.consolidate(optimizer=optimizer)
    assert report["reset_optimizer_tensors"] == 40 and len(optimizer.state) == 0


def test_consolidate_is_exact_when_the_memory_can_hold_the_whole_adapter():
    # memory rank 32 + 4 >= min(out, in) of every module (32 x 32 and 16 x 32): nothing is cut
    model = get_peft_model(tiny_llama(), small_config(init_weights=False, tier_ranks={
        "foundation": 32, "domain": 4, "swarm": 4, "agent": 2, "context": 2}))
    ids = batch()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    report = model.base_model.consolidate()
    assert report["truncation_error"] < 1e-4
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-4)


def test_consolidate_strongest_directions_go_to_the_slowest_tier():
    model = get_peft_model(tiny_llama(), small_config(init_weights=False))
    tuner = model.base_model
    tuner.consolidate()
    layer = tuner.adapter_layers()["model.layers.0.self_attn.q_proj"]
    norms = {t: float(layer.tier_delta_weight(ADAPTER, t).norm()) for t in ("foundation", "domain")}
    singular = {t: torch.linalg.svdvals(layer.tier_delta_weight(ADAPTER, t).float()) for t in norms}
    assert float(singular["foundation"][:8].min()) >= float(singular["domain"][:4].max()) - 1e-5
    assert norms["foundation"] > norms["domain"]


@pytest.mark.parametrize("side", ["column", "row", "both"])
def test_fast_tier_updates_have_no_component_in_the_protected_subspace(side):
    model = get_peft_model(tiny_llama(), small_config(init_weights=False, protected_subspace=side))
    tuner = model.base_model
    tuner.consolidate()
    _train(model, 4)
    dynamics = tuner.dynamics()
    for name, layer in tuner.adapter_layers().items():
        fast = sum(layer.tier_delta_weight(ADAPTER, t) for t in FAST).detach()
        assert float(fast.norm()) > 1e-3  # the fast tiers did learn
        column, row = dynamics.protected[name]["column"], dynamics.protected[name]["row"]
        in_column = float((column.T @ fast).norm()) / float(fast.norm())
        in_row = float((fast @ row).norm()) / float(fast.norm())
        if side in ("column", "both"):
            assert in_column < 1e-5
        if side in ("row", "both"):
            assert in_row < 1e-5
        if side == "column":
            assert in_row > 1e-2  # the other side is free
        if side == "row":
            assert in_column > 1e-2


def test_protection_strength_below_one_damps_the_protected_component():
    basis, _ = torch.linalg.qr(torch.randn(12, 3))
    update = torch.randn(12, 5)
    damped = remove_column_component(update, basis, 0.25)
    torch.testing.assert_close(basis.T @ damped, 0.75 * (basis.T @ update))
    outside = update - basis @ (basis.T @ update)
    torch.testing.assert_close(damped - basis @ (basis.T @ damped), outside)
    update_a = torch.randn(5, 12)
    torch.testing.assert_close(remove_row_component(update_a, basis, 1.0) @ basis, torch.zeros(5, 3),
                               atol=1e-6, rtol=0)


def test_without_consolidation_protection_changes_nothing():
    plain = get_peft_model(tiny_llama(), small_config(init_weights=False))
    protected = get_peft_model(tiny_llama(), small_config(init_weights=False, protected_subspace="both"))
    torch.manual_seed(0)
    _train(plain, 2)
    torch.manual_seed(0)
    _train(protected, 2)
    for (name, a), (_, b) in zip(plain.named_parameters(), protected.named_parameters()):
        assert torch.equal(a, b), name


def _single_step_updates(importance_damping, importance):
    static = dict(density_coupling=0.0, free_decay=0.0, screened_decay=0.0, vertical_resonance=False,
                  migration_enabled=False, tiers=["agent", "context"], tier_inertia={"agent": 0.0, "context": 0.0})
    model = get_peft_model(tiny_llama(), small_config(init_weights=False, importance_damping=importance_damping,
                                                      **static))
    tuner = model.base_model
    dynamics = tuner.dynamics()
    for per_tier in dynamics.module_states.values():
        for state in per_tier.values():
            for which in ("A", "B"):
                generator = torch.Generator().manual_seed(1)
                shape = state.tensors[f"importance_{which}"].shape
                state.tensors[f"importance_{which}"] = importance * torch.rand(shape, generator=generator)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = batch()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    expected = {}
    if importance_damping > 0:  # the damping uses the importance before this step, normalised to mean 1 per tier
        for tier in ("agent", "context"):
            tensors = [s[tier].tensors[f"importance_{w}"] for s in dynamics.module_states.values() for w in "AB"]
            mean = float(sum(t.sum() for t in tensors) / sum(t.numel() for t in tensors))
            for name, layer in tuner.adapter_layers().items():
                for which in "AB":
                    importance_now = dynamics.module_states[name][tier].tensors[f"importance_{which}"].clone()
                    expected[(name, tier, which)] = 1.0 / (1.0 + importance_damping * importance_now / mean)
    tuner.dynamic_step(optimizer)
    return model, before, expected


def test_importance_damping_scales_each_update_by_one_over_one_plus_lambda_normalised_importance():
    free, before_free, _ = _single_step_updates(0.0, 1.0)
    damped, before_damped, expected = _single_step_updates(2.0, 1.0)
    layers_free, layers_damped = free.base_model.adapter_layers(), damped.base_model.adapter_layers()
    checked = 0
    for (name, tier, which), factor in expected.items():
        container = "dynamic_lora_A" if which == "A" else "dynamic_lora_B"
        key = f"base_model.model.{name}.{container}.{ADAPTER}.{tier}"
        update_free = getattr(layers_free[name], container)[ADAPTER][tier].detach() - before_free[key]
        update_damped = getattr(layers_damped[name], container)[ADAPTER][tier].detach() - before_damped[key]
        torch.testing.assert_close(update_damped, update_free * factor, rtol=1e-4, atol=1e-7)
        checked += 1
    assert checked == 16  # 4 modules x 2 tiers x (A, B)


def test_consolidation_fields_reject_bad_values_naming_the_field():
    with pytest.raises(ValueError, match=r"protected_subspace must be one of \['none', 'column', 'row', 'both'\]"):
        small_config(protected_subspace="left")
    with pytest.raises(ValueError, match=r"protection_strength must be in \[0.0, 1.0\]"):
        small_config(protection_strength=1.5)
    with pytest.raises(ValueError, match="importance_damping must be in"):
        small_config(importance_damping=-1.0)
    with pytest.raises(ValueError, match="consolidation_memory_tiers must be a positive integer"):
        small_config(consolidation_memory_tiers=0)
    with pytest.raises(ValueError, match="dynamics_horizon must be None or a positive integer"):
        small_config(dynamics_horizon=0)
    with pytest.raises(ValueError, match=r"autocorr_window_fraction must be in \(0.0, 1.0\]"):
        small_config(autocorr_window_fraction=0.0)
    model = get_peft_model(tiny_llama(), small_config(tiers=["agent", "context"], consolidation_memory_tiers=2))
    with pytest.raises(ValueError, match=r"only the tiers \['agent', 'context'\].*consolidation_memory_tiers below 2"):
        model.base_model.consolidate()


def test_protected_subspaces_survive_a_state_round_trip():
    model = get_peft_model(tiny_llama(), small_config(init_weights=False, protected_subspace="column"))
    tuner = model.base_model
    tuner.consolidate()
    _train(model, 1)
    tensors, payload = tuner.dynamics_state_dict()
    restored = get_peft_model(tiny_llama(), small_config(init_weights=False, protected_subspace="column"))
    restored.load_state_dict(model.state_dict())
    restored.base_model.dynamics().load_state_dict(tensors, payload, restored.base_model.tier_tensors())
    for name, bases in tuner.dynamics().protected.items():
        for side in ("column", "row"):
            assert torch.equal(restored.base_model.dynamics().protected[name][side], bases[side])
    assert restored.base_model.dynamics().counters["consolidations"] == 1


def test_dynamics_horizon_scales_window_bandwidth_and_makes_patterns_and_migrations_fire():
    config = small_config(dynamics_horizon=20, autocorr_window_fraction=0.1)
    assert config.effective_autocorr_window == 2
    assert config.effective_bandwidth_of("context") == pytest.approx(0.01 * 100 / 2)
    assert small_config(dynamics_horizon=5).effective_autocorr_window == 2  # at least two steps
    assert small_config().effective_autocorr_window == 100
    model = get_peft_model(tiny_llama(), small_config(dynamics_horizon=20, autocorr_window_fraction=0.1))
    _train(model, 8, lr=1e-3)
    counters = model.base_model.dynamics().counters
    assert counters["migrations"] > 0
    fixed = get_peft_model(tiny_llama(), small_config())
    _train(fixed, 8, lr=1e-3)
    assert fixed.base_model.dynamics().counters["migrations"] == 0  # window 100: nothing measured in 8 steps


def test_vertical_cosines_are_exposed_per_module_and_average_to_the_tier_value():
    model = get_peft_model(tiny_llama(), small_config(init_weights=False))
    _train(model, 2)
    tuner = model.base_model
    cosines = tuner.vertical_cosines()
    assert set(cosines) == {"foundation->domain", "domain->swarm", "swarm->agent", "agent->context"}
    tiers = tuner.health()["tiers"]
    for pair, values in cosines.items():
        assert set(values) == set(tuner.adapter_layers())
        assert all(-1.0 <= v <= 1.0 for v in values.values())
        fast = pair.split("->")[1]
        assert tiers[fast]["vertical"] == pytest.approx(sum(values.values()) / len(values), rel=1e-9, abs=1e-12)


def test_a_short_run_with_lossy_migrations_is_not_degraded_and_health_reads_the_whole_adapter():
    # the demo's tier layout (make demo-tiny): 20 steps, window 5; the step-20 migrations squeeze rank 4 + 4 into
    # rank 4, cutting ~30% of the destination tier's small sum but a few percent of what the module's adapter does
    config = small_config(target_modules=["q_proj", "v_proj", "o_proj"], autocorr_window=5,
                          tier_ranks={"foundation": 8, "domain": 8, "swarm": 4, "agent": 4, "context": 2})
    model = get_peft_model(tiny_llama(), config)
    _train(model, 20, lr=1e-3)
    tuner = model.base_model
    migrations = [e for e in tuner.audit_log() if e["event"] == "migration"]
    assert migrations and max(e["relative_truncation_error"] for e in migrations) > 0.15  # was DEGRADED on this
    for entry in migrations:
        assert entry["adapter_relative_truncation_error"] < entry["relative_truncation_error"]
    health = tuner.health()
    assert health["truncation_error"] == pytest.approx(max(e["adapter_relative_truncation_error"] for e in migrations))
    assert health["health"] in ("HEALTHY", "ACCEPTABLE")


def test_adapter_relative_truncation_error_is_the_change_of_the_module_delta_over_its_norm():
    model = get_peft_model(tiny_llama(), small_config(init_weights=False))
    tuner = model.base_model
    name = "model.layers.0.self_attn.q_proj"
    before = _deltas(tuner)[name]
    entry = tuner.migrate(name, "context")
    change = float((_deltas(tuner)[name] - before).norm())
    assert entry["adapter_relative_truncation_error"] == pytest.approx(change / float(before.norm()), rel=1e-3,
                                                                        abs=1e-6)


def test_boundary_steps_maps_task_changes_to_optimizer_steps():
    flags = [True, False, False, False, True, False, False, True, False, True]
    assert boundary_steps(flags, rows_per_step=2) == [2, 3, 4]
    assert boundary_steps(flags, rows_per_step=4) == [1, 2]  # rows 7 and 9 both fall into step 2
    with pytest.raises(ValueError, match="rows_per_step must be a positive integer"):
        boundary_steps(flags, rows_per_step=0)
    with pytest.raises(ValueError, match=r"boundary\[1\] must be a boolean flag"):
        boundary_steps([True, "yes"], rows_per_step=1)


def test_callback_rejects_bad_consolidation_settings():
    with pytest.raises(ValueError, match="consolidate_every must be None or a positive integer"):
        DynamicLoraCallback(consolidate_every=0)
    with pytest.raises(ValueError, match="consolidate_on_epoch must be True or False"):
        DynamicLoraCallback(consolidate_on_epoch="yes")
    with pytest.raises(ValueError, match="consolidate_at_steps must hold positive integers"):
        DynamicLoraCallback(consolidate_at_steps=[3, -1])


class _Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        ids = batch(seed=index, size=1, length=8)[0]
        return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("settings, expected", [
    ({"consolidate_every": 3}, [3, 6]),
    ({"consolidate_on_epoch": True}, [4]),  # 2 epochs of 4 steps: the boundary between them
    ({"consolidate_at_steps": [5]}, [5]),
])
def test_callback_consolidates_under_trainer(tmp_path, settings, expected):
    model = get_peft_model(tiny_llama(), small_config())
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, num_train_epochs=2,
                             learning_rate=1e-3, report_to=[], save_strategy="no", logging_steps=1,
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Rows())
    callback = DynamicLoraCallback.attach(trainer, **settings)
    trainer.train()
    assert [c["global_step"] for c in callback.consolidations] == expected
    assert model.base_model.dynamics().counters["consolidations"] == len(expected)
