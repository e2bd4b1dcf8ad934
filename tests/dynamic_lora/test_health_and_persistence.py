"""Health and NaN rollback, vertical resonance, snapshots/provenance, privacy, audit, persistence, export."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from dynamic_lora_helpers import SMALL_RANKS, batch, small_config, tiny_gpt2, tiny_llama
from isolation import run_without_reso_hf

REPO_ROOT = Path(__file__).resolve().parents[2]


def _train_steps(model, optimizer, steps, first_seed):
    losses = []
    for step in range(steps):
        ids = batch(seed=first_seed + step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        model.base_model.dynamic_step(optimizer)
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


# ----- health ---------------------------------------------------------------------------------------------


def test_nan_in_a_tier_is_critical_rolls_back_and_training_continues():
    model = get_peft_model(tiny_llama(), small_config(init_weights=False))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    _train_steps(model, optimizer, 3, first_seed=0)
    last_good = {k: v.detach().clone() for k, v in model.base_model.tier_tensors().items()}
    name = next(iter(model.base_model.adapter_layers()))
    with torch.no_grad():
        model.base_model.adapter_layers()[name].dynamic_lora_B["default"]["agent"][0, 0] = float("nan")
    ids = batch(seed=99)
    model(input_ids=ids, labels=ids).loss.backward()  # NaN loss, NaN gradients everywhere
    optimizer.step()  # every tier and the Adam moments are poisoned now
    metrics = model.base_model.dynamic_step(optimizer)
    optimizer.zero_grad()
    assert metrics["health"] == "CRITICAL" and "nonfinite" in metrics["health_reasons"]
    for key, value in model.base_model.tier_tensors().items():
        assert torch.equal(value, last_good[key]), key
    assert model.base_model.audit_log()[-1]["event"] == "nonfinite_rollback"
    assert model.base_model.audit_log()[-1]["tiers"] == ["foundation", "domain", "swarm", "agent", "context"]
    losses = _train_steps(model, optimizer, 3, first_seed=10)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert model.base_model.health()["health"] != "CRITICAL"
    assert model.base_model.health()["counters"]["nonfinite_rollbacks"] == 1
    assert all(torch.isfinite(v).all() for v in model.base_model.tier_tensors().values())


def test_health_states_follow_the_thresholds():
    model = get_peft_model(tiny_llama(), small_config(tiers=["agent", "context"]))
    tuner = model.base_model
    dynamics = tuner.dynamics()
    assert tuner.health()["health"] == "HEALTHY"
    for name in tuner.adapter_layers():  # 4 requests that a huge debt keeps waiting
        dynamics.queue.submit(name, "context", "agent", 0.5, 0.0, 10**9, tick=dynamics.step_count + 1)
    dynamics.queue.credits["context"] = -1e12
    observed = {}
    for limit in (50, 3, 2, 1):  # depth 4: < limit healthy, < 2 limit acceptable, < 4 limit degraded
        dynamics.config.health_max_queue_depth = limit
        metrics = tuner.dynamic_step(allow_missing_gradients=True)
        assert metrics["queue_depth"] == 4
        observed[limit] = metrics["health"]
    assert observed == {50: "HEALTHY", 3: "ACCEPTABLE", 2: "DEGRADED", 1: "CRITICAL"}
    assert "queue_depth" in metrics["health_reasons"]
    assert 0 < tuner.health()["healthy_fraction"] < 1


# ----- vertical resonance ---------------------------------------------------------------------------------


def _vertical_model(window):
    model = get_peft_model(tiny_llama(), small_config(
        tiers=["agent", "context"], tier_ranks={"agent": 2, "context": 2}, target_modules=["q_proj"],
        tier_inertia={"agent": 0.0, "context": 0.0}, density_coupling=0.0, free_decay=0.0, screened_decay=0.0,
        autocorr_window=window, init_weights=False))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.base_model.adapter_layers().values():
            agent_a = torch.randn(2, layer.in_features, generator=generator)
            layer.dynamic_lora_A["default"]["agent"].copy_(agent_a)
            layer.dynamic_lora_A["default"]["context"].copy_(agent_a)
            layer.dynamic_lora_B["default"]["agent"].copy_(torch.randn(layer.out_features, 2, generator=generator))
            layer.dynamic_lora_B["default"]["context"].zero_()
    model.base_model.dynamics().reset_references(model.base_model.adapter_layers())
    return model


def _push_context_along_agent(model, sign):
    with torch.no_grad():
        for layer in model.base_model.adapter_layers().values():
            layer.dynamic_lora_B["default"]["context"].add_(sign * 0.01 * layer.dynamic_lora_B["default"]["agent"])


def test_conflicting_update_is_damped():
    model = _vertical_model(window=1000)
    layer = next(iter(model.base_model.adapter_layers().values()))
    before = layer.dynamic_lora_B["default"]["context"].detach().clone()
    _push_context_along_agent(model, -1.0)  # exactly opposed to the agent tier: v = -1
    applied = layer.dynamic_lora_B["default"]["context"].detach() - before
    metrics = model.base_model.dynamic_step(allow_missing_gradients=True)
    assert metrics["tiers"]["context"]["vertical"] == pytest.approx(-1.0, abs=1e-5)
    assert metrics["tiers"]["context"]["damping"] == pytest.approx(0.5, abs=1e-5)  # 1 - 0.5 |v|
    realised = layer.dynamic_lora_B["default"]["context"].detach() - before
    torch.testing.assert_close(realised, 0.5 * applied, rtol=1e-4, atol=1e-7)


def test_aligned_pattern_is_fast_tracked_past_the_queue():
    model = _vertical_model(window=10)
    for _ in range(10):
        _push_context_along_agent(model, 1.0)
        metrics = model.base_model.dynamic_step(allow_missing_gradients=True)
    assert metrics["tiers"]["context"]["vertical_ema"] > 0.5
    events = model.base_model.audit_log()
    assert any(e["event"] == "fast_track" for e in events)
    migrations = [e for e in events if e["event"] == "migration"]
    assert migrations and all(e["fast_track"] and e["wait"] == 0 for e in migrations)


# ----- snapshots, provenance, privacy, audit ----------------------------------------------------------------

PROVENANCE_CODE = """
import torch, reso_hf
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
base = LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False))
config = reso_hf.DynamicLoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"],
    tier_ranks={"foundation": 8, "domain": 4, "swarm": 4, "agent": 2, "context": 2})
print(get_peft_model(base, config).base_model.provenance())
"""


def test_provenance_is_stable_across_processes_and_ignores_context():
    outputs = [subprocess.run([sys.executable, "-c", PROVENANCE_CODE], capture_output=True, text=True, check=True,
                              env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}).stdout.strip()
               for _ in range(2)]
    model = get_peft_model(tiny_llama(), small_config())
    tuner = model.base_model
    assert outputs[0] == outputs[1] == tuner.provenance()
    snapshot = tuner.snapshot()
    layer = next(iter(tuner.adapter_layers().values()))
    with torch.no_grad():
        layer.dynamic_lora_B["default"]["context"].add_(1.0)
    assert tuner.provenance() == snapshot.provenance  # context is excluded
    for tier in ("foundation", "domain", "swarm", "agent"):
        with torch.no_grad():
            layer.dynamic_lora_B["default"][tier][0, 0] += 1e-3
        changed = tuner.provenance()
        assert changed != snapshot.provenance, tier
        with torch.no_grad():
            layer.dynamic_lora_B["default"][tier][0, 0] -= 1e-3
    # the snapshot is frozen and restores exactly
    assert torch.count_nonzero(snapshot.tensors[next(k for k in snapshot.tensors if k.endswith("context.B"))]) == 0
    tuner.restore_snapshot(snapshot)
    for key, value in tuner.tier_tensors().items():
        assert torch.equal(value, snapshot.tensors[key])


def test_private_tiers_are_not_written_and_tier_subsets(tmp_path):
    model = get_peft_model(tiny_llama(), small_config(init_weights=False, tier_privacy={"context": "private"}))
    model.save_pretrained(tmp_path / "peft")
    keys = load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    assert keys and not any(k.endswith(".context") for k in keys)
    assert any(k.endswith(".agent") for k in keys)
    note = json.loads((tmp_path / "peft" / "dynamic_lora_state.json").read_text())
    assert note["omitted"] and "context" not in note["saved_tiers"]
    assert not (tmp_path / "peft" / "dynamic_lora_state.safetensors").exists()
    base = tiny_llama()
    torch.manual_seed(123)  # a fresh initialisation that differs from the saving model's
    loaded = PeftModel.from_pretrained(base, tmp_path / "peft")
    name, layer = next(iter(loaded.base_model.adapter_layers().items()))
    original = model.base_model.adapter_layers()[name]
    assert not torch.equal(layer.dynamic_lora_B["default"]["context"], original.dynamic_lora_B["default"]["context"])
    assert torch.equal(layer.dynamic_lora_B["default"]["agent"], original.dynamic_lora_B["default"]["agent"])
    tuner = model.base_model
    written = tuner.save_pretrained(str(tmp_path / "subset"), tiers=["foundation", "domain"])
    assert written == ["foundation", "domain"]
    subset_keys = load_file(tmp_path / "subset" / "adapter_model.safetensors").keys()
    assert {k.rsplit(".", 1)[-1] for k in subset_keys} == {"foundation", "domain"}
    with pytest.raises(ValueError, match="private"):
        tuner.save_pretrained(str(tmp_path / "ctx"), tiers=["context"])
    assert tuner.save_pretrained(str(tmp_path / "ctx"), tiers=["context"], include_private=True) == ["context"]
    with pytest.raises(ValueError, match="not tiers of adapter"):
        tuner.save_pretrained(str(tmp_path / "bad"), tiers=["episodic"])


def test_audit_log_is_json_lines(tmp_path):
    model = get_peft_model(tiny_llama(), small_config(init_weights=False, tiers=["agent", "context"]))
    tuner = model.base_model
    name = next(iter(tuner.adapter_layers()))
    tuner.migrate(name, "context")
    tuner.rollback(1)
    model.save_pretrained(tmp_path)
    lines = (tmp_path / "dynamic_lora_audit.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["event"] for e in entries] == ["migration", "rollback"]
    migration = entries[0]
    assert migration["tiers"] == ["context", "agent"] and migration["size"] == 2 * (32 + 32)
    assert len(migration["provenance"]) == 64 and "step" in migration


# ----- persistence ----------------------------------------------------------------------------------------


def _resume_config():
    return small_config(init_weights=False, autocorr_window=2, stable_windows=1, stability_threshold=0.05,
                        target_modules=["q_proj"])


def _full_state(model):
    tensors, payload = model.base_model.dynamics_state_dict()
    params = {n: p.detach().clone() for n, p in model.named_parameters() if "dynamic_lora_" in n}
    return params, tensors, json.loads(json.dumps(payload))


def test_save_load_continue_is_bit_identical_to_uninterrupted_training(tmp_path):
    def fresh():
        model = get_peft_model(tiny_llama(seed=5), _resume_config())
        return model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)

    torch.manual_seed(1)
    straight, optimizer = fresh()
    _train_steps(straight, optimizer, 4, first_seed=0)
    straight.base_model.migrate(next(iter(straight.base_model.adapter_layers())), "context")
    _train_steps(straight, optimizer, 4, first_seed=4)

    torch.manual_seed(1)
    first, optimizer = fresh()
    _train_steps(first, optimizer, 4, first_seed=0)
    first.base_model.migrate(next(iter(first.base_model.adapter_layers())), "context")
    first.save_pretrained(tmp_path)
    resumed = PeftModel.from_pretrained(tiny_llama(seed=5), tmp_path, is_trainable=True)
    optimizer = torch.optim.SGD([p for p in resumed.parameters() if p.requires_grad], lr=0.05)
    _train_steps(resumed, optimizer, 4, first_seed=4)

    params_a, tensors_a, payload_a = _full_state(straight)
    params_b, tensors_b, payload_b = _full_state(resumed)
    assert payload_a["counters"]["migrations"] >= 1 and payload_a["step"] == 8
    assert params_a.keys() == params_b.keys() and tensors_a.keys() == tensors_b.keys()
    for key in params_a:
        assert torch.equal(params_a[key], params_b[key]), key
    for key in tensors_a:
        assert torch.equal(tensors_a[key], tensors_b[key]), key
    assert payload_a == payload_b


def test_callback_restores_the_checkpoint_state_when_training_begins_and_refuses_a_checkpoint_without_one(tmp_path):
    from reso_hf.dynamic_lora import DynamicLoraCallback

    trained = get_peft_model(tiny_llama(seed=5), _resume_config())
    optimizer = torch.optim.SGD([p for p in trained.parameters() if p.requires_grad], lr=0.05)
    _train_steps(trained, optimizer, 3, first_seed=0)
    trained.save_pretrained(tmp_path / "checkpoint")
    model = get_peft_model(tiny_llama(seed=5), _resume_config())
    # what Trainer's resume does: load_adapter into the existing adapter (weights only)
    model.load_adapter(tmp_path / "checkpoint", "default", is_trainable=True)
    assert model.base_model.dynamics_state_dict()[1]["step"] == 0
    DynamicLoraCallback(resume_from_checkpoint=str(tmp_path / "checkpoint")).on_train_begin(None, None, None,
                                                                                          model=model)
    params_a, tensors_a, payload_a = _full_state(trained)
    params_b, tensors_b, payload_b = _full_state(model)
    assert payload_a == payload_b and tensors_a.keys() == tensors_b.keys()
    for key in tensors_a:
        assert torch.equal(tensors_a[key], tensors_b[key]), key
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.* holds no DynamicLoRA dynamics state"):
        DynamicLoraCallback(resume_from_checkpoint=str(tmp_path / "empty")).on_train_begin(None, None, None,
                                                                                         model=model)


def test_dynamics_files_are_safetensors_and_json_only(tmp_path):
    model = get_peft_model(tiny_llama(), small_config())
    model.save_pretrained(tmp_path)
    for path in tmp_path.iterdir():
        assert path.suffix in (".safetensors", ".json", ".jsonl", ".md"), path
    load_file(tmp_path / "dynamic_lora_state.safetensors")
    json.loads((tmp_path / "dynamic_lora_state.json").read_text())
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def _module_states(model):
    """The in-memory per-module dynamics tensors (every field, as the dynamics use them)."""
    return {(name, tier, key): tensor for name, per_tier in model.base_model.dynamics().module_states.items()
            for tier, state in per_tier.items() for key, tensor in state.tensors.items()}


def _assert_same_dynamics(model_a, model_b):
    states_a, states_b = _module_states(model_a), _module_states(model_b)
    assert states_a.keys() == states_b.keys()
    for key in states_a:
        assert states_a[key].dtype == states_b[key].dtype, key
        assert torch.equal(states_a[key], states_b[key]), key
    _, tensors_a, payload_a = _full_state(model_a)
    _, tensors_b, payload_b = _full_state(model_b)
    assert payload_a == payload_b and tensors_a.keys() == tensors_b.keys()


def test_saved_state_stores_only_what_the_weights_do_not_determine(tmp_path):
    model = get_peft_model(tiny_llama(seed=5), _resume_config())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    _train_steps(model, optimizer, 3, first_seed=0)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "dynamic_lora_state.safetensors")
    payload = json.loads((tmp_path / "dynamic_lora_state.json").read_text())
    assert payload["version"] == 2 and payload["stored_tensors"] == len(tensors)
    fields = {key.rsplit(".", 1)[1] for key in tensors if key.startswith("module.")}
    # anchors equal the weights after a step; init_B is zero; masks are bits
    assert fields == {"init_A", "importance_A", "importance_B", "screened_A_bits", "screened_B_bits", "subspace"}
    assert all(t.dtype == torch.uint8 for k, t in tensors.items() if k.endswith("_bits"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "dynamic_lora_state.safetensors"), framework="pt") as handle:
        # the tiers it describes, for readers of the file alone (reso-hf push's private-tier check)
        assert json.loads(handle.metadata()["dynamic_lora_tiers"]) == [t["name"] for t in payload["layout"]["tiers"]]
    def data_bytes(tensors):  # without the file headers, which dominate at this size
        return sum(t.numel() * t.element_size() for t in tensors.values())

    weights_bytes = data_bytes(load_file(tmp_path / "adapter_model.safetensors"))
    state_bytes = data_bytes({k: t for k, t in tensors.items() if not k.endswith(".subspace")})
    # init_A (half the weights here: A and B of q_proj have the same size) + importance (all weights) + one bit
    # per element; format 1 stored 3.25x the weights
    assert state_bytes <= (0.5 + 1 + 1 / 32) * weights_bytes
    resumed = PeftModel.from_pretrained(tiny_llama(seed=5), tmp_path, is_trainable=True)
    _assert_same_dynamics(model, resumed)


def test_anchors_that_differ_from_the_weights_are_stored_and_restored(tmp_path):
    model = get_peft_model(tiny_llama(seed=5), _resume_config())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    _train_steps(model, optimizer, 2, first_seed=0)
    ids = batch(seed=50)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()  # saved between the optimizer step and dynamic_step: anchors != weights
    model.save_pretrained(tmp_path)
    fields = {key.rsplit(".", 1)[1] for key in load_file(tmp_path / "dynamic_lora_state.safetensors")}
    assert {"anchor_A", "anchor_B"} <= fields
    resumed = PeftModel.from_pretrained(tiny_llama(seed=5), tmp_path, is_trainable=True)
    _assert_same_dynamics(model, resumed)
    for name, param in model.named_parameters():
        if param.requires_grad:  # the gradient of the step above is not saved: give it to both
            resumed.get_parameter(name).grad = param.grad.clone()
    model.base_model.dynamic_step()
    resumed.base_model.dynamic_step()
    _assert_same_dynamics(model, resumed)


def _write_format_1(model, directory):
    """The dynamics state as format version 1 wrote it: every tensor as in memory, masks as bool."""
    dynamics = model.base_model.dynamics()
    tensors, payload = dynamics.state_dict(model.base_model.tier_tensors())
    tensors = {k: v for k, v in tensors.items() if not k.startswith("module.") or k.endswith(".subspace")}
    for (name, tier, key), tensor in _module_states(model).items():
        tensors[f"module.{name}.{tier}.{key}"] = tensor.contiguous()
    for key in ("encoding", "stored_tensors"):
        del payload[key]
    payload["version"] = 1
    save_file(tensors, str(directory / "dynamic_lora_state.safetensors"))
    (directory / "dynamic_lora_state.json").write_text(json.dumps(payload))


def test_format_1_states_still_load_and_unknown_versions_are_named(tmp_path):
    model = get_peft_model(tiny_llama(seed=5), _resume_config())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    _train_steps(model, optimizer, 3, first_seed=0)
    model.base_model.migrate(next(iter(model.base_model.adapter_layers())), "context")  # a rollback point
    model.save_pretrained(tmp_path)
    _write_format_1(model, tmp_path)
    resumed = PeftModel.from_pretrained(tiny_llama(seed=5), tmp_path, is_trainable=True)
    _assert_same_dynamics(model, resumed)
    assert len(resumed.base_model.dynamics().ring) == 1

    payload = json.loads((tmp_path / "dynamic_lora_state.json").read_text())
    payload["version"] = 3
    (tmp_path / "dynamic_lora_state.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=r"format version 3; this reso_hf reads versions \[1, 2\]"):
        resumed.base_model.load_dynamics_state(str(tmp_path))
    model.save_pretrained(tmp_path / "v2")
    payload = json.loads((tmp_path / "v2" / "dynamic_lora_state.json").read_text())
    payload["stored_tensors"] += 1
    (tmp_path / "v2" / "dynamic_lora_state.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="do not belong together"):
        resumed.base_model.load_dynamics_state(str(tmp_path / "v2"))
    _assert_same_dynamics(model, resumed)  # nothing changed


def test_bit_packing_round_trips_any_shape():
    from reso_hf.dynamic_lora.dynamics import _same_bits, pack_bits, unpack_bits

    generator = torch.Generator().manual_seed(0)
    for shape in ((1,), (3, 5), (8, 8), (7, 33)):
        mask = torch.rand(shape, generator=generator) > 0.5
        packed = pack_bits(mask)
        assert packed.dtype == torch.uint8 and packed.shape == ((mask.numel() + 7) // 8,)
        assert torch.equal(unpack_bits(packed, mask), mask)
    assert pack_bits(torch.tensor([True, False, False, False, False, False, False, True, True])).tolist() == [129, 128]
    assert not _same_bits(torch.tensor([-0.0]), torch.tensor([0.0]))  # == would call them equal


# ----- export ---------------------------------------------------------------------------------------------

EXPORT_CHILD = """
import json, torch
from peft import PeftModel, LoraConfig
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
result = {}
for name in ("llama", "gpt2"):
    base = AutoModelForCausalLM.from_pretrained(f"{name}/base")
    model = PeftModel.from_pretrained(base, f"{name}/lora").eval()
    assert isinstance(model.peft_config["default"], LoraConfig)
    ids = load_file(f"{name}/ids.safetensors")["ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    save_file({"logits": logits.contiguous()}, f"{name}/child_logits.safetensors")
    result[name] = model.peft_config["default"].r
print(json.dumps(result))
"""


def test_export_lora_loads_in_plain_peft_without_reso_hf(tmp_path):
    expected, ranks = {}, {}
    for name, builder, targets in (("llama", tiny_llama, ["q_proj", "v_proj", "down_proj"]),
                                   ("gpt2", tiny_gpt2, ["c_attn", "c_fc"])):
        builder().save_pretrained(tmp_path / name / "base")
        from transformers import AutoModelForCausalLM

        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / name / "base"),
                               small_config(target_modules=targets, init_weights=False,
                                            tier_alpha={"domain": 10.0}))
        ids = batch(seed=7)
        with torch.no_grad():
            expected[name] = model(input_ids=ids).logits
        summary = model.base_model.export_lora(str(tmp_path / name / "lora"))
        ranks[name] = summary["rank"]
        assert summary["rank"] == sum(SMALL_RANKS.values())
        save_file({"ids": ids}, str(tmp_path / name / "ids.safetensors"))
    output = run_without_reso_hf(EXPORT_CHILD, tmp_path)
    assert json.loads(output.strip().splitlines()[-1]) == ranks
    for name in expected:
        child = load_file(tmp_path / name / "child_logits.safetensors")["logits"]
        assert float((child - expected[name]).abs().max()) <= 1e-5, name
