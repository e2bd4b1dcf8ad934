"""Tiny ResoLLM builders shared by the tests (a module of its own: `conftest` names collide across folders)."""

import itertools

import torch

import reso_hf

SWITCH_NAMES = ("prime_embedding", "rope_spectrum", "kuramoto", "coherence_gating")
ALL_SWITCHES = [
    dict(zip(SWITCH_NAMES, values))
    for values in itertools.product((True, False), ("golden", "geometric"), (True, False), (True, False))
]


def switch_id(switches: dict) -> str:
    return "-".join(
        f"{name}={value}" if not isinstance(value, bool) else (name if value else f"no_{name}")
        for name, value in switches.items()
    )


def micro_config(**overrides) -> "reso_hf.ResoLLMConfig":
    """A ResoLLM small enough to build in milliseconds, with every core switch on unless overridden."""
    defaults = dict(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, prime_code_dim=8,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return reso_hf.ResoLLMConfig(**{**defaults, **overrides})


_MODELS = {}


def micro_model(seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    """Cached eval-mode model per (seed, switches); tests must not mutate it."""
    key = (seed, attn_implementation, tuple(sorted(overrides.items())))
    if key not in _MODELS:
        torch.manual_seed(seed)
        config = micro_config(**overrides)
        config._attn_implementation = attn_implementation
        model = reso_hf.ResoLLMForCausalLM(config).eval()
        # Kuramoto phases near zero at init would make the coupling trivial; widen them so tests see it.
        with torch.no_grad():
            if model.model.prime_code is not None:  # zero at init: give it weights so tests see its effect
                model.model.prime_code.proj.weight.normal_(0, 0.1)
            for layer in model.model.layers:
                if layer.self_attn.kuramoto is not None:
                    layer.self_attn.kuramoto.phase_proj.weight.normal_(0, 1.0)
                if layer.coherence_gate is not None:
                    layer.coherence_gate.score.weight.normal_(0, 0.5)
                    layer.coherence_gate.score.bias.zero_()
        _MODELS[key] = model
    return _MODELS[key]
