"""The tuner owns the dynamics state of each adapter: shared configs, deepcopy, delete_adapter, pickling."""

import copy
import io
import json

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from dynamic_lora_helpers import batch, small_config, tiny_llama


def _train(model, adapter_name, steps, first_seed, lr=0.05):
    model.set_adapter(adapter_name)
    params = [p for n, p in model.named_parameters() if p.requires_grad and f".{adapter_name}." in n]
    optimizer = torch.optim.SGD(params, lr=lr)
    for step in range(steps):
        ids = batch(seed=first_seed + step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        model.base_model.dynamic_step(optimizer, adapter_name=adapter_name)
        optimizer.zero_grad()


def _config():
    return small_config(init_weights=False, autocorr_window=2, stable_windows=1, stability_threshold=0.05,
                        target_modules=["q_proj"])


def _saved_state(directory):
    tensors = load_file(directory / "dynamic_lora_state.safetensors")
    payload = json.loads((directory / "dynamic_lora_state.json").read_text())
    return tensors, payload


def _assert_state_is(directory, tuner, adapter_name):
    """The folder holds exactly `adapter_name`'s dynamics state of `tuner` (and its audit log)."""
    tensors, payload = _saved_state(directory)
    expected_tensors, expected_payload = tuner.dynamics_state_dict(adapter_name)
    assert payload == json.loads(json.dumps(expected_payload))
    assert tensors.keys() == expected_tensors.keys()
    for key in tensors:
        assert torch.equal(tensors[key], expected_tensors[key]), key
    audit = [json.loads(line) for line in (directory / "dynamic_lora_audit.jsonl").read_text().splitlines()]
    assert audit == json.loads(json.dumps(tuner.audit_log(adapter_name)))


def test_one_config_shared_by_two_adapters_saves_each_adapters_own_state(tmp_path):
    config = _config()
    model = get_peft_model(tiny_llama(), config)
    model.add_adapter("second", config)  # the same config object, PEFT's usual pattern
    _train(model, "default", 3, first_seed=0)
    _train(model, "second", 2, first_seed=10)
    tuner = model.base_model
    assert tuner.dynamics("default").step_count == 3 and tuner.dynamics("second").step_count == 2
    model.save_pretrained(tmp_path)
    _assert_state_is(tmp_path, tuner, "default")
    _assert_state_is(tmp_path / "second", tuner, "second")

    # and each saved adapter resumes bit for bit
    resumed = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    resumed.load_adapter(tmp_path / "second", "second", is_trainable=True)
    for name, seed in (("default", 20), ("second", 30)):
        _train(model, name, 2, first_seed=seed)
        _train(resumed, name, 2, first_seed=seed)
        expected_tensors, expected_payload = tuner.dynamics_state_dict(name)
        actual_tensors, actual_payload = resumed.base_model.dynamics_state_dict(name)
        assert json.loads(json.dumps(actual_payload)) == json.loads(json.dumps(expected_payload))
        for key in expected_tensors:
            assert torch.equal(actual_tensors[key], expected_tensors[key]), (name, key)
        for key, value in tuner.tier_tensors(name).items():
            assert torch.equal(resumed.base_model.tier_tensors(name)[key], value), (name, key)


def test_one_config_shared_by_two_models_saves_each_models_own_state(tmp_path):
    config = _config()
    first = get_peft_model(tiny_llama(), config)
    second = get_peft_model(tiny_llama(seed=1), config)  # attached last
    _train(first, "default", 3, first_seed=0)
    _train(second, "default", 1, first_seed=5)
    first.save_pretrained(tmp_path / "first")
    second.save_pretrained(tmp_path / "second")
    _assert_state_is(tmp_path / "first", first.base_model, "default")
    _assert_state_is(tmp_path / "second", second.base_model, "default")


def test_deepcopy_of_a_model_owns_a_separate_state(tmp_path):
    model = get_peft_model(tiny_llama(), _config())
    _train(model, "default", 2, first_seed=0)
    clone = copy.deepcopy(model)
    _train(clone, "default", 3, first_seed=10)
    assert model.base_model.dynamics().step_count == 2 and clone.base_model.dynamics().step_count == 5
    # provenance recorded by the clone's dynamics is the clone's, not the original's
    assert clone.base_model.dynamics()._provenance() == clone.base_model.provenance()
    assert clone.base_model.provenance() != model.base_model.provenance()
    clone.save_pretrained(tmp_path / "clone")
    model.save_pretrained(tmp_path / "original")
    _assert_state_is(tmp_path / "clone", clone.base_model, "default")
    _assert_state_is(tmp_path / "original", model.base_model, "default")


def test_deleting_the_adapter_that_last_used_a_shared_config_keeps_save_working(tmp_path):
    config = _config()
    model = get_peft_model(tiny_llama(), config)
    model.add_adapter("second", config)
    _train(model, "default", 2, first_seed=0)
    model.delete_adapter("second")
    model.save_pretrained(tmp_path)
    _assert_state_is(tmp_path, model.base_model, "default")
    assert not (tmp_path / "second").exists()


def test_delete_adapter_frees_every_per_adapter_structure():
    config = _config()
    model = get_peft_model(tiny_llama(), config)
    model.add_adapter("second", config)
    _train(model, "second", 1, first_seed=0)
    model.eval()
    with torch.no_grad():  # fills the fused-factor cache of the active adapter
        model(input_ids=batch(seed=3))
    layers = list(model.base_model.adapter_layers("second").values())
    assert layers and all("second" in layer._fused_cache for layer in layers)
    model.set_adapter("default")
    model.delete_adapter("second")
    for layer in layers:
        for structure in ("tier_names", "tier_ranks", "tier_scalings", "_fused_cache", "dynamic_lora_A",
                          "dynamic_lora_B", "dynamic_lora_dropout", "dynamic_lora_scale"):
            assert "second" not in getattr(layer, structure), structure
        assert "default" in layer.tier_names
    assert "second" not in model.base_model.dynamics_registry
    assert set(model.base_model.dynamics_registry) == {"default"}


def test_torch_save_and_load_of_the_peft_model_round_trips_like_lora():
    def round_trip(model):
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)  # a user's own pickle, as with LoRA

    ids = batch(seed=4)
    lora = get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"],
                                                   init_lora_weights=False))
    with torch.no_grad():
        assert torch.equal(round_trip(lora)(input_ids=ids).logits, lora(input_ids=ids).logits)

    model = get_peft_model(tiny_llama(), _config())
    _train(model, "default", 3, first_seed=0)
    loaded = round_trip(model)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    # the loaded model owns a state equal to the original's and continues identically
    _train(model, "default", 2, first_seed=10)
    _train(loaded, "default", 2, first_seed=10)
    expected_tensors, expected_payload = model.base_model.dynamics_state_dict()
    actual_tensors, actual_payload = loaded.base_model.dynamics_state_dict()
    assert json.loads(json.dumps(actual_payload)) == json.loads(json.dumps(expected_payload))
    for key in expected_tensors:
        assert torch.equal(actual_tensors[key], expected_tensors[key]), key
    assert loaded.base_model.dynamics()._provenance() == loaded.base_model.provenance()
