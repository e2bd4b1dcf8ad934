"""The default tier scaling (issue 18, DynamicLoRA 5): s_t = sqrt(R / (T rank_t)), so that sum_t s_t^2 rank_t = R and
one Adam step changes the weights as much as a LoRA of the same total rank R with lora_alpha = R (README)."""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from reso_hf.dynamic_lora import DynamicLoraConfig

from dynamic_lora_helpers import small_config


def test_default_scaling_gives_every_tier_an_equal_share_of_a_rank_r_lora_step():
    config = DynamicLoraConfig(target_modules=["q_proj"])  # ranks 32/16/8/4/2, R = 62, T = 5
    scalings = {t: config.scaling_of(t) for t in config.tiers}
    # the values the README's table gives
    assert {t: round(s, 3) for t, s in scalings.items()} == {
        "foundation": 0.622, "domain": 0.880, "swarm": 1.245, "agent": 1.761, "context": 2.490}
    for tier in config.tiers:
        assert scalings[tier] ** 2 * config.rank_of(tier) == pytest.approx(62 / 5)
    assert sum(s ** 2 * config.rank_of(t) for t, s in scalings.items()) == pytest.approx(62)
    small = small_config()  # ranks 8/4/4/2/2: R = 20
    assert sum(small.scaling_of(t) ** 2 * small.rank_of(t) for t in small.tiers) == pytest.approx(20)
    # one tier: exactly a LoRA with lora_alpha = r
    assert DynamicLoraConfig(target_modules=["q_proj"], tiers=["agent"]).scaling_of("agent") == 1.0
    # alpha and tier_alpha still override it with LoRA's alpha / rank
    overridden = DynamicLoraConfig(target_modules=["q_proj"], alpha=32.0, tier_alpha={"context": 1.0})
    assert overridden.scaling_of("foundation") == 1.0 and overridden.scaling_of("context") == 0.5


def _first_adam_step_norm(config, hidden: int = 128) -> float:
    """Frobenius norm of the weight change of one q_proj after one Adam step from the initial adapter."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                                        max_position_embeddings=64, tie_word_embeddings=False))
    model = get_peft_model(base, config)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    before = layer.get_delta_weight("default").detach().clone()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 101, (4, 32), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return float((layer.get_delta_weight("default").detach() - before).norm())


def test_one_adam_step_of_the_default_moves_the_weights_like_a_lora_of_the_same_total_rank():
    total_rank = DynamicLoraConfig(target_modules=["q_proj"]).total_rank
    lora = _first_adam_step_norm(LoraConfig(r=total_rank, lora_alpha=total_rank, target_modules=["q_proj"]))
    default = _first_adam_step_norm(DynamicLoraConfig(target_modules=["q_proj"], dynamics_enabled=False))
    previous = _first_adam_step_norm(DynamicLoraConfig(target_modules=["q_proj"], dynamics_enabled=False, alpha=32.0))
    # README: the step is about lr sqrt(out / 3) sqrt(sum_t s_t^2 rank_t), the same sum as LoRA's R for the default
    predicted = 1e-3 * math.sqrt(128 / 3) * math.sqrt(total_rank)
    assert 0.8 < default / lora < 1.25
    assert 0.8 < default / predicted < 1.3
    # the previous default (alpha = the largest rank): sum_t (32 / rank_t)^2 rank_t = 992 = 16 R, a 4x larger step
    assert 3.2 < previous / lora < 4.8
