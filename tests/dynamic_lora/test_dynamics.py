"""Inertia, interaction density, importance/phases/decay/homeostasis, and the Trainer callback."""

import math

import pytest
import torch
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from dynamic_lora_helpers import VOCAB, batch, small_config, tiny_llama
from reso_hf.dynamic_lora import DynamicLoraCallback

STATIC = dict(density_coupling=0.0, free_decay=0.0, screened_decay=0.0, vertical_resonance=False,
              migration_enabled=False)


def _one_step(optimizer_name: str, context_inertia: float):
    model = get_peft_model(
        tiny_llama(),
        small_config(tiers=["agent", "context"], tier_inertia={"agent": 0.0, "context": context_inertia},
                     init_weights=False, **STATIC),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (torch.optim.AdamW(params, lr=1e-2) if optimizer_name == "adamw"
                 else torch.optim.SGD(params, lr=0.5))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = batch()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.base_model.dynamic_step(optimizer)
    optimizer.zero_grad()
    return {n: (p.detach() - before[n]) for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("optimizer_name", ["adamw", "sgd"])
def test_inertia_099_moves_one_percent_as_far_as_inertia_0(optimizer_name):
    free = _one_step(optimizer_name, 0.0)
    heavy = _one_step(optimizer_name, 0.99)
    context_free = torch.cat([d.reshape(-1) for n, d in free.items() if n.endswith(".context")])
    context_heavy = torch.cat([d.reshape(-1) for n, d in heavy.items() if n.endswith(".context")])
    assert context_free.norm() > 0
    # element-wise up to float32 rounding of the stored parameters (|theta| < 1, eps 6e-8)
    torch.testing.assert_close(context_heavy, 0.01 * context_free, rtol=1e-4, atol=2e-7)
    assert float(context_heavy.norm() / context_free.norm()) == pytest.approx(0.01, rel=1e-3)
    # the agent tier (alpha 0 in both runs) moved identically
    for name in free:
        if name.endswith(".agent"):
            torch.testing.assert_close(free[name], heavy[name], rtol=1e-6, atol=1e-9)


def test_interaction_density_raises_effective_inertia_by_the_formula():
    """density_gradient='factors' (first release): rho from the norms of the factor gradients."""
    model = get_peft_model(tiny_llama(), small_config(init_weights=False, free_decay=0.0, screened_decay=0.0,
                                                     vertical_resonance=False, migration_enabled=False,
                                                     density_gradient="factors"))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    ids = batch()
    model(input_ids=ids, labels=ids).loss.backward()
    grad_norms = {}
    for name, param in model.named_parameters():
        if param.grad is not None and "dynamic_lora_" in name:
            tier = name.rsplit(".", 1)[-1]
            grad_norms[tier] = grad_norms.get(tier, 0.0) + float(param.grad.pow(2).sum())
    optimizer.step()
    metrics = model.base_model.dynamic_step(optimizer)
    config = model.peft_config["default"]
    norms = {t: math.sqrt(v) for t, v in grad_norms.items()}
    mean = sum(norms.values()) / len(norms)
    for tier, values in metrics["tiers"].items():
        rho = norms[tier] / mean
        assert values["density"] == pytest.approx(rho, rel=1e-6)
        expected = config.inertia_of(tier) + (1 - config.inertia_of(tier)) * math.tanh(max(0.0, rho - 1.0))
        assert values["alpha_eff"] == pytest.approx(expected, rel=1e-6)
        assert values["alpha_eff"] >= config.inertia_of(tier)
    assert any(v["density"] > 1 for v in metrics["tiers"].values())


@pytest.mark.parametrize("world_size", [1, 4])
def test_density_of_delta_w_counts_the_agents_sharing_a_tier(monkeypatch, world_size):
    """density_gradient='delta_w' (SPEC §5.2): dL/d dW_t is the same for every tier of a module, so rho_t is
    n_agents(t) / mean: 1 everywhere in one process; under 4 ranks the shared tiers get 4 / 2.8."""
    import reso_hf.dynamic_lora.dynamics as dynamics_module

    monkeypatch.setattr(dynamics_module, "distributed_world", lambda: (world_size > 1, world_size, 0))
    model = get_peft_model(tiny_llama(), small_config(init_weights=False, vertical_resonance=False,
                                                     migration_enabled=False))
    ids = batch()
    model(input_ids=ids, labels=ids).loss.backward()
    metrics = model.base_model.dynamic_step()
    config = model.peft_config["default"]
    agents = {t: (world_size if config.scope_of(t) in ("shared", "swarm") else 1) for t in config.tiers}
    mean = sum(agents.values()) / len(agents)
    for tier, values in metrics["tiers"].items():
        rho = agents[tier] / mean
        assert values["density"] == pytest.approx(rho, rel=1e-9)
        expected = config.inertia_of(tier) + (1 - config.inertia_of(tier)) * math.tanh(max(0.0, rho - 1.0))
        assert values["alpha_eff"] == pytest.approx(expected, rel=1e-9)
    if world_size == 1:
        assert all(v["alpha_eff"] == pytest.approx(config.inertia_of(t)) for t, v in metrics["tiers"].items())
    else:  # the rank-8 per-agent tiers keep their base inertia; the shared ones slow down
        assert metrics["tiers"]["agent"]["alpha_eff"] == pytest.approx(0.5)
        assert metrics["tiers"]["swarm"]["alpha_eff"] > 0.8
    with pytest.raises(ValueError, match=r"density_gradient must be one of \['delta_w', 'factors'\], got 'x'"):
        small_config(density_gradient="x")


def _phase_model(**overrides):
    values = dict(tiers=["agent", "context"], tier_inertia={"agent": 0.0, "context": 0.0}, density_coupling=0.0,
                  importance_beta=0.0, screening_threshold=1.5, homeostasis_lower=0.0, homeostasis_upper=1.0,
                  vertical_resonance=False, migration_enabled=False, target_modules=["q_proj"])
    values.update(overrides)
    return get_peft_model(tiny_llama(), small_config(**values))


def _set_values_and_grads(model, special_grad):
    """theta = 1 everywhere, grad = 1 except element [0, 0] of every context A factor."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "dynamic_lora_" in name:
                param.fill_(1.0)
                param.grad = torch.ones_like(param)
                if name.endswith("dynamic_lora_A.default.context"):
                    param.grad[0, 0] = special_grad


def test_phases_screen_with_hysteresis_and_decay_at_two_rates():
    model = _phase_model()
    tuner = model.base_model
    dynamics = tuner.dynamics()
    name = next(iter(dynamics.module_states))
    init_a = dynamics.module_states[name]["context"].tensors["init_A"]
    observed = []
    for special in (3.0, 1.4, 1.0, 1.4):  # enter, stay (above 0.8 tau = 1.2), leave, stay free
        _set_values_and_grads(model, special)
        tuner.dynamic_step()
        state = dynamics.module_states[name]["context"]
        param = tuner.adapter_layers()[name].dynamic_lora_A["default"]["context"]
        decay = float((1.0 - param[0, 0].detach()) / (1.0 - init_a[0, 0]))
        observed.append((bool(state.tensors["screened_A"][0, 0]), decay))
    assert [flag for flag, _ in observed] == [True, True, False, False]
    # float32: 1 - theta is about 1e-4, so the measured rate carries a relative error of about 1e-3
    assert [decay for _, decay in observed] == pytest.approx([1e-4, 1e-4, 1e-2, 1e-2], rel=2e-3)
    # a typical element (normalised importance about 1 < tau) is FREE and decays at 1e-2
    other = tuner.adapter_layers()[name].dynamic_lora_A["default"]["context"][1, 1].detach()
    assert float((1.0 - other) / (1.0 - init_a[1, 1])) == pytest.approx(1e-2, rel=1e-5)


def test_homeostasis_moves_tau_and_is_audited():
    model = _phase_model(screening_threshold=0.5, homeostasis_lower=0.4, homeostasis_upper=0.7)
    _set_values_and_grads(model, 1.0)  # all importances equal: normalised 1 > 0.5 -> everything screened
    metrics = model.base_model.dynamic_step()
    assert metrics["tiers"]["context"]["screened_fraction"] == 1.0
    assert metrics["tiers"]["context"]["threshold"] == pytest.approx(0.55)
    model2 = _phase_model(screening_threshold=2.0, homeostasis_lower=0.4, homeostasis_upper=0.7)
    _set_values_and_grads(model2, 1.0)
    metrics2 = model2.base_model.dynamic_step()
    assert metrics2["tiers"]["context"]["screened_fraction"] == 0.0
    assert metrics2["tiers"]["context"]["threshold"] == pytest.approx(1.8)
    events = [e for e in model2.base_model.audit_log() if e["event"] == "threshold_change"]
    assert events and events[-1]["changes"]["context"]["to"] == pytest.approx(1.8)


def test_dynamic_step_without_gradients_is_an_error():
    model = get_peft_model(tiny_llama(), small_config())
    with pytest.raises(RuntimeError, match="before optimizer.zero_grad"):
        model.base_model.dynamic_step()


class _TokenDataset(torch.utils.data.Dataset):
    def __init__(self, count=16, length=12):
        generator = torch.Generator().manual_seed(0)
        self.rows = torch.randint(0, VOCAB, (count, length), generator=generator)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return {"input_ids": self.rows[index], "labels": self.rows[index]}


def test_trainer_runs_the_callback_after_every_optimizer_step(tmp_path):
    model = get_peft_model(tiny_llama(), small_config(autocorr_window=3))
    callback = DynamicLoraCallback()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=2,
                             report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_TokenDataset(), callbacks=[callback])
    trainer.train()
    assert callback.steps == 6
    assert model.base_model.dynamics().step_count == 6
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all("dynamic_lora/health" in entry for entry in logged)
    assert all("dynamic_lora/tiers/context/alpha_eff" in entry for entry in logged)
    health = model.base_model.health()
    assert health["health"] in ("HEALTHY", "ACCEPTABLE", "DEGRADED")
    assert health["step"] == 6


@pytest.mark.parametrize("dynamics_enabled", [True, False])
def test_callback_refuses_deepspeed_whose_zero_leaves_no_gradients_to_read(dynamics_enabled):
    """Under DeepSpeed ZeRO-2 (2 CPU processes, deepspeed 0.19.8) param.grad of every factor was None after the
    step: the run stopped at the first step with "found no gradient", advice that did not apply. Now the
    callback names DeepSpeed before training; an adapter whose dynamics are off is not refused."""
    from types import SimpleNamespace

    model = get_peft_model(tiny_llama(), small_config(dynamics_enabled=dynamics_enabled))
    args = SimpleNamespace(deepspeed_plugin=object())  # what TrainingArguments holds under DeepSpeed
    callback = DynamicLoraCallback()
    if dynamics_enabled:
        with pytest.raises(ValueError, match=r"DeepSpeed ZeRO .* leaves param.grad empty.*adapters \['default'\]"
                                             r".* or set dynamics_enabled=False"):
            callback.on_train_begin(args, None, None, model=model)
    else:
        assert callback.on_train_begin(args, None, "control", model=model) == "control"
    assert callback.on_train_begin(SimpleNamespace(deepspeed_plugin=None), None, "control", model=model) == "control"


@pytest.mark.parametrize("follows", [True, False])
def test_decay_of_a_tier_follows_its_inertia(follows):
    """No update and no importance: every element is FREE and B decays toward 0 at free_decay * (1 - alpha)."""
    model = get_peft_model(tiny_llama(), small_config(init_weights=False, density_coupling=0.0,
                                                      vertical_resonance=False, migration_enabled=False,
                                                      decay_follows_inertia=follows))
    config = model.peft_config["default"]
    layers = model.base_model.adapter_layers()
    before = {(n, t): layer.dynamic_lora_B["default"][t].detach().clone()
              for n, layer in layers.items() for t in config.tiers}
    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.zeros_like(param)
    model.base_model.dynamic_step()
    for (name, tier), old in before.items():
        new = layers[name].dynamic_lora_B["default"][tier].detach()
        rate = config.free_decay * ((1.0 - config.inertia_of(tier)) if follows else 1.0)
        torch.testing.assert_close(new, (1.0 - rate) * old, rtol=1e-6, atol=1e-9)
    # the foundation tier (alpha 0.99) keeps 99.99% per step when decay follows inertia, 99% otherwise
    assert config.inertia_of("foundation") == pytest.approx(0.99)
