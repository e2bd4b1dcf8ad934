"""Contracts that transformers' common model tests expect of every model (issue 18): beam search with
`return_dict_in_generate`, `inputs_embeds`, `resize_token_embeddings`, static cache, `torch.compile(fullgraph=True)`,
`torch.export`, RoPE scaling, the tensor-parallel plan and the generic task heads."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from reso_test_models import ALL_SWITCHES, micro_config, micro_model, switch_id
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache
from transformers.generation import GenerateBeamDecoderOnlyOutput
from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

import reso_hf
from reso_hf.modeling.resonance import prime_code_table

PROMPT = torch.tensor([[4, 5, 6, 7], [0, 8, 9, 10]])
PROMPT_MASK = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])


# ----------------------------------------------------------------------------------------- 1. beam search


@pytest.mark.parametrize("do_sample", [False, True], ids=["beam_search", "beam_sample"])
def test_beam_search_with_return_dict_is_plain_generation_mixin(do_sample):
    model = micro_model()
    kwargs = dict(attention_mask=PROMPT_MASK, max_new_tokens=5, num_beams=3, do_sample=do_sample, pad_token_id=0,
                  output_scores=True)
    torch.manual_seed(0)
    out = model.generate(PROMPT, return_dict_in_generate=True, **kwargs)
    assert isinstance(out, GenerateBeamDecoderOnlyOutput)
    assert out.beam_indices is not None and len(out.scores) == out.sequences.shape[1] - PROMPT.shape[1]
    torch.manual_seed(0)
    assert torch.equal(out.sequences, model.generate(PROMPT, **kwargs))


# ---------------------------------------------------- 2-3. static cache, torch.compile, torch.export


# All 16 combinations pass (checked once); the suite runs the four that trace different code.
TRACED_SWITCHES = [ALL_SWITCHES[0], ALL_SWITCHES[-1], dict(ALL_SWITCHES[-1], kuramoto=True),
                   dict(ALL_SWITCHES[-1], prime_embedding=True, coherence_gating=True)]


@pytest.mark.parametrize("switches", ALL_SWITCHES, ids=switch_id)
def test_every_switch_combination_decodes_with_a_static_cache(switches):
    model = micro_model(**switches)
    kwargs = dict(attention_mask=PROMPT_MASK, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(PROMPT, cache_implementation="static", **kwargs), model.generate(PROMPT, **kwargs))


@pytest.mark.parametrize("switches", TRACED_SWITCHES, ids=switch_id)
def test_switch_combinations_compile_fullgraph_and_export(switches):
    model = micro_model(**switches)
    with torch.no_grad():
        eager = model(PROMPT, attention_mask=PROMPT_MASK, use_cache=False).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        assert torch.allclose(compiled(PROMPT, attention_mask=PROMPT_MASK, use_cache=False).logits, eager, atol=1e-6)
        exported = torch.export.export(model, (PROMPT,), {"attention_mask": PROMPT_MASK, "use_cache": False})
        assert torch.allclose(exported.module()(PROMPT, attention_mask=PROMPT_MASK, use_cache=False).logits, eager,
                              atol=1e-6)


@pytest.mark.parametrize("kuramoto", [True, False], ids=["kuramoto", "no_kuramoto"])
def test_compiled_decode_step_with_a_static_cache_equals_eager(kuramoto):
    model = micro_model(kuramoto=kuramoto)
    step_ids = torch.tensor([[11], [12]])
    logits = {}
    for name in ("eager", "compiled"):
        cache = StaticCache(config=model.config, max_cache_len=8)
        with torch.no_grad():
            model(PROMPT, attention_mask=PROMPT_MASK, past_key_values=cache, use_cache=True)
            torch._dynamo.reset()
            forward = torch.compile(model, fullgraph=True, backend="eager") if name == "compiled" else model
            mask = torch.cat([PROMPT_MASK, torch.ones(2, 1, dtype=torch.long)], dim=1)
            logits[name] = forward(step_ids, attention_mask=mask, past_key_values=cache, use_cache=True,
                                   position_ids=torch.tensor([[4], [3]])).logits
        if kuramoto:  # the running phase sums live in the decoder layer's own cache layer, at the cache positions
            counts = cache.layers[0].phase_sums[:, 0, :5, 2]
            assert torch.equal(counts, torch.tensor([[1.0, 2, 3, 4, 5], [0, 1, 2, 3, 4]]))
    torch.testing.assert_close(logits["compiled"], logits["eager"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kuramoto", [True, False], ids=["kuramoto", "no_kuramoto"])
def test_static_cache_export_recipe_decodes_like_the_eager_model(kuramoto):
    # transformers' ExecuTorch recipe: a torch.export program holding a StaticCache, fed one token at a time.
    model = micro_model(kuramoto=kuramoto)
    model.generation_config.cache_implementation = "static"
    try:
        wrapper = TorchExportableModuleWithStaticCache(model, batch_size=1, max_cache_len=12)
        model.model.prepare_cache(wrapper.static_cache)  # the phase sums must exist before tracing
        for index, layer in enumerate(wrapper.static_cache.layers):
            if kuramoto:
                wrapper.register_buffer(f"phase_sums_{index}", layer.phase_sums, persistent=False)
            else:
                assert not hasattr(layer, "phase_sums")
        program = torch.export.export(wrapper, (), {"input_ids": torch.tensor([[4]]),
                                                    "cache_position": torch.tensor([0])}, strict=False).module()
    finally:
        model.generation_config.cache_implementation = None
    tokens = [4, 5, 6, 7, 8, 9]
    with torch.no_grad():
        full = model(torch.tensor([tokens]), use_cache=False).logits[0]
        stepped = torch.cat([program(input_ids=torch.tensor([[t]]), cache_position=torch.tensor([i]))[0]
                             for i, t in enumerate(tokens)])
    assert torch.allclose(stepped, full, atol=1e-5)


def test_out_of_range_token_ids_still_get_a_clear_error_in_eager_mode():
    with pytest.raises(ValueError, match=r"token id 97, outside the vocabulary \[0, 96\]"):
        micro_model()(torch.tensor([[4, 97]]))


def test_a_cache_filled_by_another_model_is_refused_with_kuramoto():
    plain, kuramoto = micro_model(kuramoto=False), micro_model(kuramoto=True)
    with torch.no_grad():
        cache = plain(PROMPT, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="cache layer 0 is a filled DynamicLayer. Supported: an empty DynamicCache"):
            kuramoto(torch.tensor([[4], [5]]), past_key_values=cache, use_cache=True)


# ----------------------------------------------------------------------------------------- 5. inputs_embeds


@pytest.mark.parametrize("switches", ALL_SWITCHES, ids=switch_id)
def test_inputs_embeds_from_the_input_embeddings_equal_input_ids(switches):
    model = micro_model(**switches)
    with torch.no_grad():
        from_ids = model(PROMPT, attention_mask=PROMPT_MASK).logits
        embeds = model.get_input_embeddings()(PROMPT)
        from_embeds = model(inputs_embeds=embeds, attention_mask=PROMPT_MASK).logits
    assert torch.equal(from_embeds, from_ids)


def test_generate_from_inputs_embeds_with_beams_continues_like_input_ids():
    model = micro_model()  # every switch on, the prime code included
    kwargs = dict(attention_mask=PROMPT_MASK, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    from_ids = model.generate(PROMPT, **kwargs)[:, PROMPT.shape[1]:]
    from_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(PROMPT).detach(), **kwargs)
    assert torch.equal(from_embeds, from_ids)


# ------------------------------------------------------------------------------ 4. resize_token_embeddings


@pytest.mark.parametrize("prime_embedding", [True, False], ids=["prime_embedding", "no_prime_embedding"])
def test_resize_token_embeddings_updates_the_vocabulary_and_the_prime_code(prime_embedding):
    torch.manual_seed(0)
    model = reso_hf.ResoLLMForCausalLM(micro_config(prime_embedding=prime_embedding)).eval()
    with torch.no_grad():
        before = model(PROMPT).logits
    model.resize_token_embeddings(120)
    assert model.config.vocab_size == model.vocab_size == 120
    assert model.get_input_embeddings().weight.shape == (120, 32)
    assert model.lm_head.weight is model.get_input_embeddings().weight  # still tied
    new_tokens = torch.tensor([[4, 100, 119]])
    with torch.no_grad():
        assert torch.allclose(model(PROMPT).logits[..., :97], before, atol=1e-6)  # old tokens unchanged
        assert model(new_tokens).logits.shape == (1, 3, 120)  # new ids run
    if prime_embedding:
        prime_code = model.model.prime_code
        assert prime_code.code_table.shape == (120, 8)
        assert torch.equal(prime_code.code_table, prime_code_table(120, 8))  # token i keeps the i-th prime
    with pytest.raises(ValueError, match=r"token id 120, outside the vocabulary \[0, 119\]"):
        model(torch.tensor([[120]]))


def test_checkpoints_with_the_old_prime_code_keys_still_load(tmp_path):
    model = micro_model()
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    legacy = {key.replace("model.embed_tokens.prime_code.", "model.prime_code."): value
              for key, value in weights.items()}
    assert "model.prime_code.proj.weight" in legacy
    save_file(legacy, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = reso_hf.ResoLLMForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.model.prime_code.proj.weight, model.model.prime_code.proj.weight)
    with torch.no_grad():
        assert torch.equal(loaded(PROMPT).logits, model(PROMPT).logits)


# ------------------------------------------------------------------------------------ 6. RoPE scaling


LLAMA_DIMS = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=False)
SWITCHES_OFF = dict(prime_embedding=False, rope_spectrum="geometric", kuramoto=False, coherence_gating=False)
ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8},
}


@pytest.mark.parametrize("name", ROPE_SCALINGS)
def test_rope_scaling_matches_llama_with_the_same_weights(name):
    rope_parameters = {**ROPE_SCALINGS[name], "rope_theta": 50000.0}
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**LLAMA_DIMS, rope_parameters=dict(rope_parameters))).eval()
    reso = reso_hf.ResoLLMForCausalLM(reso_hf.ResoLLMConfig(**LLAMA_DIMS, **SWITCHES_OFF,
                                                            rope_parameters=dict(rope_parameters))).eval()
    reso.load_state_dict(llama.state_dict())
    ids = torch.randint(3, 97, (1, 40))  # past max_position_embeddings: the scaling acts
    with torch.no_grad():
        assert torch.allclose(reso(ids).logits, llama(ids).logits, atol=1e-5)
    plain = reso_hf.ResoLLMForCausalLM(reso_hf.ResoLLMConfig(**LLAMA_DIMS, **SWITCHES_OFF, rope_theta=50000.0)).eval()
    plain.load_state_dict(llama.state_dict())
    positions = torch.arange(40)[None]
    scaled_cos, _ = reso.model.rotary_emb(torch.zeros(1), positions)
    plain_cos, _ = plain.model.rotary_emb(torch.zeros(1), positions)
    assert not torch.allclose(scaled_cos, plain_cos, atol=1e-3)  # the scaling acts on these positions


def test_rope_parameters_round_trip_and_bad_values_are_named():
    config = reso_hf.ResoLLMConfig(rope_spectrum="geometric", rope_parameters={**ROPE_SCALINGS["llama3"],
                                                                               "rope_theta": 500000.0})
    assert config.rope_theta == 500000.0
    assert reso_hf.ResoLLMConfig(**config.to_dict()).rope_parameters == config.rope_parameters
    legacy = reso_hf.ResoLLMConfig(rope_spectrum="geometric", rope_scaling={"type": "linear", "factor": 2.0})
    assert legacy.rope_parameters["rope_type"] == "linear" and legacy.rope_parameters["factor"] == 2.0
    with pytest.raises(ValueError, match=r"rope_parameters\['rope_type'\]='linear' is invalid: expected 'default' "
                                         r"with rope_spectrum='golden'"):
        reso_hf.ResoLLMConfig(rope_parameters={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match=r"rope_parameters\['rope_type'\]='cubic' is invalid: expected one of"):
        reso_hf.ResoLLMConfig(rope_spectrum="geometric", rope_parameters={"rope_type": "cubic"})
    with pytest.raises(ValueError, match=r"rope_parameters=.* is invalid: .*\{'factor'\}"):
        reso_hf.ResoLLMConfig(rope_spectrum="geometric", rope_parameters={"rope_type": "linear"})
