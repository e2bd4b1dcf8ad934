"""ResoLLMConfig: aliases, presets, sub-configs, validation (SPEC §2)."""

import pytest

import reso_hf
from reso_hf import AgencyConfig, PRSCConfig, ResoLLMConfig, StabilityConfig


def test_seed_names_are_aliases_of_the_hf_names():
    config = ResoLLMConfig(dim=512, num_layers=8, num_heads=8, ffn_dim=1000, max_seq_len=777)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (512, 8, 8)
    assert (config.intermediate_size, config.max_position_embeddings) == (1000, 777)
    assert config.dim == 512 and config.num_layers == 8 and config.ffn_dim == 1000
    config.dim = 64
    assert config.hidden_size == 64


@pytest.mark.parametrize(
    "preset, layers, hidden",
    [(reso_hf.small_config, 4, 256), (reso_hf.medium_config, 8, 512), (reso_hf.large_config, 24, 1024)],
)
def test_presets_have_the_seed_dimensions(preset, layers, hidden):
    config = preset()
    assert (config.num_hidden_layers, config.hidden_size) == (layers, hidden)
    assert config.prime_embedding and config.kuramoto and config.coherence_gating
    assert preset(vocab_size=300).vocab_size == 300


def test_multi_agent_config_enables_entanglement_for_the_node():
    config = reso_hf.multi_agent_config("agent_alpha")
    assert config.entanglement.enabled and config.entanglement.node_id == "agent_alpha"


def test_sub_configs_accept_objects_and_dicts_and_round_trip(tmp_path):
    config = ResoLLMConfig(agency=AgencyConfig(enabled=True, max_foci=3), prsc={"max_bindings": 7},
                           stability=StabilityConfig(lyapunov_threshold=0.2))
    assert config.agency.max_foci == 3 and config.prsc.max_bindings == 7
    config.save_pretrained(tmp_path)
    loaded = ResoLLMConfig.from_pretrained(tmp_path)
    assert loaded.agency == config.agency and loaded.prsc == PRSCConfig(max_bindings=7)
    assert loaded.stability.lyapunov_threshold == 0.2
    assert loaded.to_dict()["agency"]["max_foci"] == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rope_spectrum": "fibonacci"}, r"rope_spectrum='fibonacci' is invalid: expected one of \('geometric', 'golden'\)"),
        ({"hidden_size": 0}, r"hidden_size=0 is invalid: expected an int >= 1"),
        ({"num_key_value_heads": 3}, r"num_key_value_heads=3 is invalid: expected a divisor of num_attention_heads=8"),
        ({"hidden_size": 100}, r"hidden_size=100 is invalid: expected a multiple of num_attention_heads=8"),
        ({"kuramoto": "yes"}, r"kuramoto='yes' is invalid: expected a bool"),
        ({"prime_code_dim": 7}, r"prime_code_dim=7 is invalid: expected an even int"),
        ({"coherence_threshold": 1.5}, r"coherence_threshold=1.5 is invalid: expected a number in \(0.0, 1.0\)"),
        ({"prsc": {"bogus": 1}}, r"prsc has unknown fields \['bogus'\]"),
        ({"agency": 3}, r"agency must be a AgencyConfig or a dict"),
        ({"agency": {"max_goals": 0}}, r"agency.max_goals=0 is invalid: expected an int >= 1"),
        ({"stability": {"window_size": 3}}, r"stability.window_size=3 is invalid: expected an int >= 5"),
        ({"temporal_smf": {"memory_decay_rate": -1}}, r"temporal_smf.memory_decay_rate=-1 is invalid"),
        ({"hidden_act": "swish2"}, r"hidden_act='swish2' is invalid"),
        ({"head_dim": 2}, r"head_dim=2 is invalid: expected >= 4 when kuramoto=True"),
    ],
)
def test_invalid_values_raise_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResoLLMConfig(**kwargs)

