"""Config validation, registration, fused forward, merging, save/load through PEFT and transformers."""

import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, load_peft_weights, set_peft_model_state_dict

import reso_hf
from reso_hf.dynamic_lora import DynamicLoraConfig, DynamicLoraConv1D, DynamicLoraLinear, DynamicLoraModel

from dynamic_lora_helpers import SMALL_RANKS, batch, small_config, tiny_gpt2, tiny_llama

# ----- config --------------------------------------------------------------------------------------------


def test_default_tiers_follow_the_spec():
    config = DynamicLoraConfig(target_modules=["q_proj"])
    assert config.tiers == ["foundation", "domain", "swarm", "agent", "context"]
    assert [config.rank_of(t) for t in config.tiers] == [32, 16, 8, 4, 2]
    assert [config.inertia_of(t) for t in config.tiers] == [0.99, 0.9, 0.7, 0.5, 0.1]
    assert [config.scope_of(t) for t in config.tiers] == ["shared", "shared", "swarm", "agent", "session"]
    assert config.total_rank == 62
    assert config.peft_type == PeftType.DYNAMIC_LORA
    assert (config.importance_beta, config.screened_decay, config.free_decay) == (0.85, 1e-4, 1e-2)
    assert (config.autocorr_window, config.stable_windows, config.stability_threshold) == (100, 3, 0.7)
    assert config.migration_bandwidth == {"context": 0.01, "agent": 0.005, "swarm": 0.001, "domain": 0.0001}
    assert (config.vertical_threshold, config.conflict_threshold, config.horizontal_resonance) == (0.5, 0.3, False)


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        (dict(tiers=["foundation", "episodic"]), ["tiers", "episodic", "foundation", "context"]),
        (dict(tier_ranks={"agent": 0}), ["tier_ranks", "agent", "positive"]),
        (dict(tier_ranks={"agent": -3}), ["tier_ranks", "agent", "positive"]),
        (dict(tier_ranks={"workspace": 4}), ["tier_ranks", "workspace", "allowed"]),
        (dict(tier_inertia={"context": 1.0}), ["tier_inertia", "context", "[0, 1)"]),
        (dict(tier_inertia={"context": -0.1}), ["tier_inertia", "context", "[0, 1)"]),
        (dict(tier_privacy={"agent": "secret"}), ["tier_privacy", "private", "public"]),
        (dict(tiers=["context", "foundation"]), ["tiers", "ordered slowest first"]),
        (dict(importance_beta=1.5), ["importance_beta", "[0.0, 1.0)"]),
        (dict(autocorr_window=0), ["autocorr_window", "positive"]),
    ],
)
def test_bad_config_values_name_the_field_and_the_allowed_values(kwargs, fragments):
    with pytest.raises(ValueError) as error:
        DynamicLoraConfig(target_modules=["q_proj"], **kwargs)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_registration_is_idempotent_and_uses_the_enum():
    reso_hf.register_dynamic_lora()
    reso_hf.register_dynamic_lora()
    member = PeftType("DYNAMIC_LORA")
    assert member is PeftType.DYNAMIC_LORA and "DYNAMIC_LORA" in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is DynamicLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is DynamicLoraModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == "dynamic_lora_"


def test_target_modules_matching_nothing_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Target modules .*no_such_proj.* not found in the base model"):
        get_peft_model(tiny_llama(), small_config(target_modules=["no_such_proj"]))


# ----- forward -------------------------------------------------------------------------------------------


def _randomise_factors(peft_model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "dynamic_lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("builder, targets, layer_cls", [
    (tiny_llama, ["q_proj", "v_proj", "down_proj"], DynamicLoraLinear),
    (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], DynamicLoraConv1D),
])
def test_fused_forward_equals_per_tier_sum(builder, targets, layer_cls):
    model = get_peft_model(builder(), small_config(target_modules=targets, tier_alpha={"domain": 12.0}))
    _randomise_factors(model)
    layers = model.base_model.adapter_layers()
    assert layers and all(isinstance(layer, layer_cls) for layer in layers.values())
    x = torch.randn(3, 5, next(iter(layers.values())).in_features)
    for layer in layers.values():
        if layer.in_features != x.shape[-1]:
            continue
        base_out = layer.get_base_layer()(x)
        fused = layer(x) - base_out
        reference = layer.unfused_delta(x, "default")
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
        # and both equal the explicit delta weight
        delta = layer.get_delta_weight("default")
        explicit = x @ delta if layer.weight_is_transposed else x @ delta.T
        torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-6)
        # domain scaling 12/4 = 3 must be visible
        assert layer.tier_scalings["default"]["domain"] == 3.0


@pytest.mark.parametrize("builder, targets", [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn", "c_proj"])])
def test_merge_unmerge_and_merge_and_unload(builder, targets):
    model = get_peft_model(builder(), small_config(target_modules=targets))
    _randomise_factors(model)
    ids = batch()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
        assert (adapted - plain).abs().max() > 1e-3  # the adapter does something
        model.base_model.merge_adapter()
        merged = model(input_ids=ids).logits
        model.base_model.unmerge_adapter()
        unmerged = model(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unmerged, adapted, rtol=1e-5, atol=1e-6)
    unloaded = model.merge_and_unload()
    assert not any("dynamic_lora_" in name for name, _ in unloaded.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(unloaded(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-5)


def test_trainable_parameters_are_exactly_the_tiers(capsys):
    model = get_peft_model(tiny_llama(), small_config())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total_rank = sum(SMALL_RANKS.values())
    # 2 layers x (q_proj 32->32, v_proj 32->16): rank x (in + out) per module
    expected = total_rank * 2 * ((32 + 32) + (32 + 16))
    assert sum(p.numel() for p in trainable.values()) == expected
    assert all("dynamic_lora_" in n for n in trainable)
    model.print_trainable_parameters()
    assert f"trainable params: {expected:,}" in capsys.readouterr().out


# ----- save / load ---------------------------------------------------------------------------------------


def test_peft_save_and_from_pretrained_round_trip(tmp_path):
    model = get_peft_model(tiny_llama(), small_config())
    _randomise_factors(model)
    ids = batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    written = {p.name for p in tmp_path.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "dynamic_lora_state.safetensors",
            "dynamic_lora_state.json", "dynamic_lora_audit.jsonl"} <= written
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in written)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "DYNAMIC_LORA"
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert isinstance(loaded.base_model, DynamicLoraModel)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_auto_peft_model_loads_from_a_local_base(tmp_path):
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), small_config())
    _randomise_factors(model)
    ids = batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_transformers_load_adapter_and_delete_adapter(tmp_path):
    model = get_peft_model(tiny_llama(), small_config())
    _randomise_factors(model)
    ids = batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    base = tiny_llama()
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    base.load_adapter(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids).logits, expected, rtol=0, atol=0)
    base.delete_adapter("default")
    assert not any("dynamic_lora_" in name for name, _ in base.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids).logits, plain, rtol=0, atol=0)


def test_loading_with_a_different_tier_layout_fails_and_changes_nothing(tmp_path):
    model = get_peft_model(tiny_llama(), small_config())
    _randomise_factors(model)
    model.save_pretrained(tmp_path)
    other = get_peft_model(tiny_llama(), small_config(tiers=["agent", "context"]))
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    state_before = other.base_model.dynamics_state_dict()
    with pytest.raises(ValueError, match="different tier layout"):
        other.base_model.load_dynamics_state(str(tmp_path))
    with pytest.raises(ValueError, match="tier layouts differ"):
        set_peft_model_state_dict(other, load_peft_weights(str(tmp_path)), adapter_name="default")
    with pytest.raises(ValueError, match="tier layouts differ"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path, config=small_config(tiers=["agent", "context"]))
    for name, param in other.named_parameters():
        assert torch.equal(param, before[name]), name
    state_after = other.base_model.dynamics_state_dict()
    assert state_before[1] == state_after[1]
    for key, tensor in state_before[0].items():
        assert torch.equal(tensor, state_after[0][key])


def test_ddp_ignore_list_holds_exactly_the_non_shared_tiers():
    model = get_peft_model(tiny_llama(), small_config())
    names = model.base_model.ddp_params_to_ignore(prefix="module.")
    assert names and all(n.startswith("module.") for n in names)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"swarm", "agent", "context"}
    assert len(names) == 3 * 2 * 4  # tiers x factors x (2 layers x q_proj, v_proj)


def test_works_on_reso_llm(tmp_path):
    def micro_reso(seed=0):
        torch.manual_seed(seed)
        config = reso_hf.ResoLLMConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       prime_code_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return reso_hf.ResoLLMForCausalLM(config).eval()

    model = get_peft_model(micro_reso(), small_config(target_modules=["q_proj", "v_proj", "down_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        ids = batch(seed=step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        model.base_model.dynamic_step(optimizer)
        optimizer.zero_grad()
    model.eval()
    ids = batch(seed=50)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert model.base_model.dynamics().step_count == 3
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(micro_reso(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_tier_scaling_is_alpha_over_rank_when_alpha_is_given():
    # (the default, alpha=None, is tested in test_default_scaling.py)
    config = small_config(alpha=2.0, tier_alpha={"context": 1.0})
    assert config.scaling_of("foundation") == 0.25 and config.scaling_of("context") == 0.5
    with pytest.raises(ValueError, match=r"DynamicLoraConfig.alpha must be in \(0.0, inf\], got -1"):
        small_config(alpha=-1.0)
    # the tier factors are scaled in the forward pass: y - W0 x = sum_t s_t B_t A_t x
    model = get_peft_model(tiny_llama(), small_config(init_weights=False))
    layer = next(iter(model.base_model.adapter_layers().values()))
    x = torch.randn(3, layer.in_features)
    default = small_config()
    expected = sum(default.scaling_of(t) * x @ layer.dynamic_lora_A["default"][t].T @ layer.dynamic_lora_B["default"][t].T
                   for t in default.tiers)
    with torch.no_grad():
        torch.testing.assert_close(layer(x) - layer.get_base_layer()(x), expected, rtol=1e-5, atol=1e-6)


def test_default_tiers_stay_under_five_percent_of_smollm2_135m_on_the_default_targets():
    """Issue 20: the default ranks (32/16/8/4/2) on PEFT's q/v targets, and the share on all four attention projections
    (README, DynamicLoRA). SmolLM2-135M's shapes on the meta device: nothing is allocated for the base."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shapes = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    shares = {}
    for label, targets in (("q_v", None), ("attention", ["q_proj", "k_proj", "v_proj", "o_proj"])):
        with torch.device("meta"):
            base = LlamaForCausalLM(shapes)
        base_parameters = sum(p.numel() for p in base.parameters())
        model = get_peft_model(base, DynamicLoraConfig(task_type="CAUSAL_LM", target_modules=targets))
        adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
        shares[label] = adapter / base_parameters
    assert base_parameters == 134_515_008
    assert shares["q_v"] == pytest.approx(62 * 1920 * 30 / 134_515_008) and shares["q_v"] < 0.05  # 2.65%
    assert shares["attention"] == pytest.approx(62 * 3840 * 30 / 134_515_008)  # 5.31%


def test_an_adapter_saved_with_the_former_default_ranks_fails_to_load_with_the_fix_in_the_message(tmp_path):
    model = get_peft_model(tiny_llama(), small_config(tiers=["agent", "context"], tier_ranks={"agent": 8, "context": 4}))
    model.save_pretrained(str(tmp_path))
    config_path = tmp_path / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    saved["tier_ranks"] = {}  # what an adapter saved with the defaults before issue 20 holds
    config_path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r'has rank 8 .* gives rank 4: the tier layouts differ\. The adapter was saved '
                                         r'with the former default ranks .* add "tier_ranks": \{"agent": 8, "context": 4\}'):
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
