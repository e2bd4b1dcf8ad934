"""Converting a pretrained Llama-family causal LM into a ResoLLM (SPEC §8).

A ResoLLM with every resonant switch off has Llama's parameter names and shapes, so the source's weights load
as they are. Each switched-on component starts as a no-op, so the converted model computes the source's
function and training the resonant parts starts from the pretrained model:

- `prime_embedding`: the prime-code projection starts at zero.
- `kuramoto`: the phase projection starts at zero, so every content phase is 0 and the mean-field pull is
  0; `kuramoto_keeps_position` adds the content phase to the reserved pair's positional angle instead of
  replacing it, so that pair keeps the source's rotary angle at every position.
- `coherence_gating`: `coherence_gate_normalized` divides each gate by its value at the initial score
  (`ResoLLMCoherenceGate.INITIAL_BIAS`) and the gate starts there (score weight 0), so it is exactly 1, and
  unlike a saturated open gate it passes a gradient to its score.
- `rope_spectrum="golden"` replaces the source's rotary frequencies: no identity exists, positions are re-learnt
  (a warning says so).
"""

from __future__ import annotations

import os
import warnings

import torch

from .loading import load_causal_lm, load_tokenizer, resolve_model_source
from .modeling import ResoLLMConfig, ResoLLMForCausalLM

SUPPORTED_ARCHITECTURES = ("llama", "mistral")
SWITCHES = ("prime_embedding", "rope_spectrum", "kuramoto", "coherence_gating")
# Llama fields carried into the ResoLLM config as they are.
CARRIED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "hidden_act",
                  "initializer_range", "attention_dropout", "mlp_bias", "rope_parameters", "tie_word_embeddings",
                  "pad_token_id", "bos_token_id", "eos_token_id")


def converted_config(source_config, **switches) -> ResoLLMConfig:
    """The ResoLLM config of a Llama-family config, with the given switches (all off unless given)."""
    model_type = getattr(source_config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"cannot convert a {model_type!r} model: supported architectures are "
                         f"{SUPPORTED_ARCHITECTURES} (Llama 2/3, SmolLM2, TinyLlama; Mistral without sliding window)")
    if model_type == "mistral" and getattr(source_config, "sliding_window", None) is not None:
        raise ValueError(f"cannot convert this mistral model: its sliding_window={source_config.sliding_window} "
                         "attention has no ResoLLM equivalent; supported: sliding_window=None")
    if getattr(source_config, "attention_bias", False):
        raise ValueError("cannot convert a model with attention_bias=True: ResoLLM's attention projections have no bias")
    unknown = sorted(set(switches) - set(SWITCHES))
    if unknown:
        raise ValueError(f"unknown switches {unknown}; allowed: {SWITCHES}")
    fields = {name: getattr(source_config, name) for name in CARRIED_FIELDS if getattr(source_config, name, None)
              is not None}
    fields["rope_parameters"] = dict(source_config.rope_parameters)
    settings = dict(prime_embedding=False, rope_spectrum="geometric", kuramoto=False, coherence_gating=False)
    settings.update(switches)
    if settings["rope_spectrum"] == "golden":
        warnings.warn("rope_spectrum='golden' replaces the source's rotary frequencies: the converted model does not "
                      "compute the source's function and positions are re-learnt in training", stacklevel=3)
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": fields["rope_parameters"]["rope_theta"]}
    return ResoLLMConfig(**fields, **settings, kuramoto_keeps_position=True, coherence_gate_normalized=True,
                         source_model=getattr(source_config, "_name_or_path", None) or None)


@torch.no_grad()
def convert_from_llama(source, **switches) -> ResoLLMForCausalLM:
    """A ResoLLM holding a Llama-family model's weights, every switched-on component at its identity.

    source: a loaded Llama/Mistral causal LM, or what `reso_hf.loading` accepts (Hub id, folder, `.gguf` file).
    switches: `prime_embedding`, `rope_spectrum`, `kuramoto`, `coherence_gating` (all off unless given).
    """
    if isinstance(source, torch.nn.Module):
        source_model, name = source, getattr(source.config, "_name_or_path", "")
    else:
        resolved = resolve_model_source(str(source), field="source")
        if resolved.is_adapter:
            raise ValueError(f"source: {source!r} is an adapter folder; merge it into its base model first "
                             "(PeftModel.merge_and_unload) or convert the base model")
        source_model, name = load_causal_lm(resolved), resolved.name
    source_model.config._name_or_path = name
    config = converted_config(source_model.config, **switches)
    model = ResoLLMForCausalLM(config)
    missing, unexpected = model.load_state_dict(source_model.state_dict(), strict=False)
    expected_missing = set(resonant_parameter_names(model)) | ({"lm_head.weight"} if config.tie_word_embeddings else set())
    not_loaded = sorted(set(missing) - expected_missing)
    if not_loaded or unexpected:
        raise ValueError(f"the source's weights do not fit the converted model: missing {not_loaded[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    start_at_identity(model)
    model.tie_weights()
    model.to(next(source_model.parameters()).dtype)
    return model.eval()


RESONANT_COMPONENTS = ("prime_code", "kuramoto", "coherence_gate")


@torch.no_grad()
def start_at_identity(model: ResoLLMForCausalLM, components=RESONANT_COMPONENTS) -> None:
    """Set the switched-on resonant `components` (default all) to their no-op (see the module docstring).

    Applied to a trained model with one component, it knocks that component out and keeps the others."""
    unknown = set(components) - set(RESONANT_COMPONENTS)
    if unknown:
        raise ValueError(f"components={sorted(unknown)} are invalid: expected a subset of {RESONANT_COMPONENTS}")
    backbone = model.model
    if backbone.prime_code is not None and "prime_code" in components:
        backbone.prime_code.proj.weight.zero_()
    for layer in backbone.layers:
        if layer.self_attn.kuramoto is not None and "kuramoto" in components:
            layer.self_attn.kuramoto.phase_proj.weight.zero_()
        if layer.coherence_gate is not None and "coherence_gate" in components:
            layer.coherence_gate.start_as_identity()


def resonant_component(parameter_name: str) -> str | None:
    """The resonant component (one of RESONANT_COMPONENTS) that a parameter belongs to; None for the source's own."""
    marked = f".{parameter_name}"
    return next((component for component in RESONANT_COMPONENTS if f".{component}." in marked), None)


def resonant_parameter_names(model: ResoLLMForCausalLM) -> list[str]:
    """The parameters conversion adds to the source's (what `--train resonant` trains)."""
    return [name for name, _ in model.named_parameters() if resonant_component(name)]


def convert_and_save(source, output_dir: str, **switches) -> ResoLLMForCausalLM:
    """Convert `source` and write a Hub-ready folder: the weights, the config (with `source_model`), the modeling
    code for `trust_remote_code`, and the source's tokenizer and chat template."""
    model = convert_from_llama(source, **switches)
    model.save_pretrained(output_dir)
    if not isinstance(source, torch.nn.Module):
        load_tokenizer(resolve_model_source(str(source), field="source")).save_pretrained(output_dir)
    return model


# ----------------------------------------------------------------------------------------------------------
# `reso-hf convert`


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert a Llama-family model into a ResoLLM that computes the same function",
        description="Convert SOURCE (a Hub id, a model folder or a .gguf file of a llama or mistral causal LM) into "
                    "a ResoLLM folder OUT: the source's weights and tokenizer, every switched-on resonant component "
                    "at its identity. With no switch the ResoLLM is the source itself.")
    parser.add_argument("source", help="Hub id, model folder or .gguf file")
    parser.add_argument("output_dir", help="folder to write (must be new or empty, unless --overwrite_output_dir)")
    parser.add_argument("--prime_embedding", action="store_true", help="add the prime code (projection at zero)")
    parser.add_argument("--kuramoto", action="store_true", help="add Kuramoto phase coupling (phase projection at zero)")
    parser.add_argument("--coherence_gating", action="store_true", help="add coherence gates (fully open)")
    parser.add_argument("--rope_spectrum", choices=("geometric", "golden"), default="geometric",
                        help="golden replaces the source's rotary frequencies: positions must be re-learnt")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="write into a non-empty output_dir")
    parser.set_defaults(func=run_convert)


def run_convert(arguments) -> int:
    if os.path.isdir(arguments.output_dir) and os.listdir(arguments.output_dir) and not arguments.overwrite_output_dir:
        raise FileExistsError(f"output_dir {arguments.output_dir!r} is not empty; choose a new folder or pass "
                              "--overwrite_output_dir")
    switches = {name: getattr(arguments, name) for name in ("prime_embedding", "kuramoto", "coherence_gating")}
    model = convert_and_save(arguments.source, arguments.output_dir, rope_spectrum=arguments.rope_spectrum, **switches)
    added = sum(model.get_parameter(name).numel() for name in resonant_parameter_names(model))
    on = [name for name, value in switches.items() if value] + (["golden spectrum"] if arguments.rope_spectrum ==
                                                                  "golden" else [])
    print(f"converted {arguments.source} -> {arguments.output_dir}: {model.num_parameters():,} parameters, "
          f"{added:,} added by {', '.join(on) or 'no switch'}"
          + (" (all at identity: the model computes the source's function)" if arguments.rope_spectrum == "geometric"
             else ""))
    return 0
