"""WaveGen generation cache (issue 14): the key, correctness of hits, the invalidation rule, eviction, persistence,
refusal of non-deterministic decoding and the migration export."""

import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from reso_test_models import micro_config

import reso_hf
from reso_hf.adapter_composition import AdapterComposite
from reso_hf.wavegen import CACHE_FILE, WaveGenCache, cached_generate, tier_component

TIERS = ("foundation", "domain", "swarm", "agent", "context")
PROMPT = torch.tensor([[1, 5, 6, 7, 9]])
GREEDY = dict(max_new_tokens=6, do_sample=False)


def fresh_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return reso_hf.ResoLLMForCausalLM(micro_config(**overrides)).eval()


def dynamic_model(seed: int = 0):
    """A DynamicLoRA model whose tiers all act (random B) on q/v."""
    model = fresh_model(seed)
    config = reso_hf.DynamicLoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"],
                                       init_weights=False)
    torch.manual_seed(seed + 1)
    return get_peft_model(model, config).eval()


def tier_factor(model, tier: str, which: str = "B") -> torch.Tensor:
    layer = model.base_model.adapter_layers()["model.layers.0.self_attn.q_proj"]
    return (layer.dynamic_lora_B if which == "B" else layer.dynamic_lora_A)["default"][tier]


@torch.no_grad()
def nudge(tensor: torch.Tensor, amount: float = 0.5) -> None:
    tensor.add_(amount)  # in place, as an optimizer step writes


def fresh_generate(model, input_ids, seed=None, generate_seed=None, **kwargs):
    """model.generate under torch.manual_seed(seed); generate_seed is passed on as generate(seed=...) (ResoLLM)."""
    with torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        if generate_seed is not None:
            kwargs["seed"] = generate_seed
        return model.generate(input_ids, **kwargs)


# ----- key -------------------------------------------------------------------------------------------------------
def test_a_repeated_call_hits_and_equals_the_fresh_generation():
    model = dynamic_model()
    cache = WaveGenCache()
    first = cached_generate(model, cache, PROMPT, **GREEDY)
    assert cache.last_event["result"] == "miss"
    second = cache.generate(model, PROMPT, **GREEDY)
    assert cache.last_event["result"] == "hit"
    assert torch.equal(first, second)
    assert torch.equal(second, fresh_generate(model, PROMPT, **GREEDY))
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 1 and cache.stats()["hit_rate"] == 0.5


@pytest.mark.parametrize("change", ["prompt", "mask", "max_new_tokens", "num_beams", "repetition_penalty", "seed",
                                    "base", *TIERS])
def test_changing_any_one_component_of_the_key_misses(change):
    model = dynamic_model()
    cache = WaveGenCache()
    prompt, mask = PROMPT, torch.ones_like(PROMPT)
    kwargs = dict(max_new_tokens=6, do_sample=True, seed=11)
    cache.generate(model, prompt, attention_mask=mask, **kwargs)
    cache.generate(model, prompt, attention_mask=mask, **kwargs)
    assert cache.last_event["result"] == "hit"
    if change == "prompt":
        prompt = torch.tensor([[1, 5, 6, 7, 10]])
    elif change == "mask":
        mask = torch.tensor([[0, 1, 1, 1, 1]])
    elif change == "max_new_tokens":
        kwargs["max_new_tokens"] = 7
    elif change == "num_beams":
        kwargs["num_beams"] = 2
    elif change == "repetition_penalty":
        kwargs["repetition_penalty"] = 1.3
    elif change == "seed":
        kwargs["seed"] = 12
    elif change == "base":
        nudge(model.get_base_model().model.layers[1].mlp.down_proj.weight, 0.01)
    else:
        nudge(tier_factor(model, change))
    output = cache.generate(model, prompt, attention_mask=mask, **kwargs)
    expected = "invalidated" if change == "base" or change in TIERS else "miss"
    assert cache.last_event["result"] == expected
    if expected == "invalidated":
        component = "base" if change == "base" else tier_component("default", change)
        assert cache.last_event["changed"] == [component]
        assert cache.stats()["invalidations"] == {component: 1}
    assert torch.equal(output, fresh_generate(model, prompt, seed=kwargs.pop("seed"), attention_mask=mask, **kwargs))


def test_a_generation_config_object_is_part_of_the_key():
    from transformers import GenerationConfig

    model = _SHARED["model"]
    cache = WaveGenCache()
    three = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0)
    first = cache.generate(model, PROMPT, generation_config=three)
    assert first.shape[1] == PROMPT.shape[1] + 3
    cache.generate(model, PROMPT, generation_config=GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0))
    assert cache.last_event["result"] == "hit"
    cache.generate(model, PROMPT, generation_config=GenerationConfig(max_new_tokens=4, do_sample=False, pad_token_id=0))
    assert cache.last_event["result"] == "miss"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=st.lists(st.integers(3, 96), min_size=1, max_size=6),
       mode=st.sampled_from(["greedy", "beam", "sample"]), seed=st.integers(0, 2**31 - 1),
       new_tokens=st.integers(1, 5))
def test_property_every_hit_equals_a_fresh_generation_with_the_same_settings(prompt, mode, seed, new_tokens):
    model = _SHARED["model"]
    cache = WaveGenCache()
    input_ids = torch.tensor([[1, *prompt]])
    kwargs = dict(max_new_tokens=new_tokens, do_sample=mode == "sample", num_beams=2 if mode == "beam" else 1)
    call_seed = seed if mode == "sample" else None
    cache.generate(model, input_ids, seed=call_seed, **kwargs)
    torch.manual_seed(1234)  # the global RNG must not matter for a hit (nor be changed by it)
    hit = cache.generate(model, input_ids, seed=call_seed, **kwargs)
    after_hit = torch.rand(1)
    assert cache.last_event["result"] == "hit"
    assert torch.equal(hit, fresh_generate(model, input_ids, seed=call_seed, **kwargs))
    torch.manual_seed(1234)
    assert torch.equal(torch.rand(1), after_hit)


_SHARED = {"model": dynamic_model(seed=3)}


# ----- invalidation rule ----------------------------------------------------------------------------------------
def test_a_context_change_spares_entries_made_with_the_context_tier_switched_off():
    model = dynamic_model()
    composite = AdapterComposite(model, {"default": 1.0})
    cache = WaveGenCache()
    cache.generate(model, PROMPT, **GREEDY)  # all tiers act
    composite.use_tiers("default", TIERS[:-1])
    without_context = cache.generate(model, PROMPT, **GREEDY)
    assert cache.last_event["result"] == "miss"  # another configuration: another key
    key_without = cache.last_event["key"]
    assert tier_component("default", "context") not in cache.entries[key_without].dependencies

    nudge(tier_factor(model, "context"), 2.0)
    nudge(tier_factor(model, "context", "A"), 2.0)
    assert cache.validate(model) == {}  # the current configuration (no context) does not depend on it
    survivor = cache.generate(model, PROMPT, **GREEDY)
    assert cache.last_event["result"] == "hit"
    assert torch.equal(survivor, without_context)
    assert torch.equal(survivor, fresh_generate(model, PROMPT, **GREEDY))  # zero-scaled tier: exactly no effect

    composite.use_tiers("default", TIERS)
    cache.generate(model, PROMPT, **GREEDY)
    assert cache.last_event == {"result": "invalidated", "key": cache.last_event["key"],
                                "changed": [tier_component("default", "context")]}


def test_a_slow_tier_change_invalidates_every_entry_that_uses_it():
    model = dynamic_model()
    composite = AdapterComposite(model, {"default": 1.0})
    cache = WaveGenCache()
    prompts = [torch.tensor([[1, 4 + i, 9]]) for i in range(3)]
    for prompt in prompts:
        cache.generate(model, prompt, **GREEDY)
    composite.use_tiers("default", TIERS[:-1])
    for prompt in prompts:
        cache.generate(model, prompt, **GREEDY)
    assert len(cache) == 6
    nudge(tier_factor(model, "foundation"))
    assert cache.validate(model) == {tier_component("default", "foundation"): 3}  # this configuration's entries
    composite.use_tiers("default", TIERS)
    assert cache.validate(model) == {tier_component("default", "foundation"): 3}
    assert len(cache) == 0
    assert cache.stats()["invalidations"] == {tier_component("default", "foundation"): 6}


def test_plain_lora_adapter_scale_and_disabled_adapter():
    torch.manual_seed(0)
    model = get_peft_model(fresh_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False)).eval()
    cache = WaveGenCache()
    with model.disable_adapter():
        plain = cache.generate(model, PROMPT, **GREEDY)
        assert sorted(cache.entries[cache.last_event["key"]].dependencies) == ["base", "runtime"]
    cache.generate(model, PROMPT, **GREEDY)
    assert "adapter:default" in cache.entries[cache.last_event["key"]].dependencies
    composite = AdapterComposite(model, {"default": 1.0})
    composite.set_weight("default", 0.5)
    halved = cache.generate(model, PROMPT, **GREEDY)
    assert cache.last_event["changed"] == ["adapter:default"]
    assert torch.equal(halved, fresh_generate(model, PROMPT, **GREEDY))
    # the plain model (same weights, no adapter) finds the entry made with the adapter disabled
    plain_model = fresh_model()
    assert torch.equal(cache.generate(plain_model, PROMPT, **GREEDY), plain)
    assert cache.last_event["result"] == "hit"


def test_base_weights_written_through_data_need_forget_or_rehash_base():
    model = fresh_model()
    cache, strict = WaveGenCache(), WaveGenCache(rehash_base=True)
    for c in (cache, strict):
        c.generate(model, PROMPT, **GREEDY)
    model.model.layers[0].mlp.up_proj.weight.data += 0.5  # bypasses the version counter
    strict.generate(model, PROMPT, **GREEDY)
    assert strict.last_event["changed"] == ["base"]
    cache.hasher.forget()
    cache.generate(model, PROMPT, **GREEDY)
    assert cache.last_event["changed"] == ["base"]


# ----- eviction ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy,expected_victim", [("lru", 1), ("lfu", 0)])
def test_eviction_policy_picks_its_victim(policy, expected_victim):
    model = _SHARED["model"]
    cache = WaveGenCache(max_entries=2, eviction=policy, migration_threshold=None)
    prompts = [torch.tensor([[1, 10 + i]]) for i in range(3)]
    cache.generate(model, prompts[0], **GREEDY)
    cache.generate(model, prompts[1], **GREEDY)
    cache.generate(model, prompts[1], **GREEDY)  # prompt 1: one hit, and the most recent use
    cache.generate(model, prompts[1], **GREEDY)
    cache.generate(model, prompts[0], **GREEDY)  # prompt 0: one hit, most recent use now
    cache.generate(model, prompts[2], **GREEDY)  # full: evict one
    assert cache.stats()["evictions"] == 1 and len(cache) == 2
    cache.generate(model, prompts[expected_victim], **GREEDY)
    assert cache.last_event["result"] == "miss"


def test_bad_settings_are_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match=r"eviction must be one of \['lru', 'lfu'\], got 'fifo'"):
        WaveGenCache(eviction="fifo")
    with pytest.raises(ValueError, match="max_entries must be an int >= 1, got 0"):
        WaveGenCache(max_entries=0)
    with pytest.raises(ValueError, match="migration_threshold must be an int >= 1 or None"):
        WaveGenCache(migration_threshold=0)


# ----- persistence ------------------------------------------------------------------------------------------------
def test_persistence_round_trip(tmp_path):
    model = _SHARED["model"]
    cache = WaveGenCache(max_entries=5, eviction="lfu", migration_threshold=3)
    first = cache.generate(model, PROMPT, **GREEDY)
    cache.generate(model, PROMPT, **GREEDY)
    path = cache.save_pretrained(str(tmp_path))
    assert os.path.basename(path) == CACHE_FILE
    assert [p for p in os.listdir(tmp_path) if p != CACHE_FILE] == []  # no temporary left
    json.loads(open(path, encoding="utf-8").read())  # plain JSON
    loaded = WaveGenCache.from_pretrained(str(tmp_path))
    assert (loaded.max_entries, loaded.eviction, loaded.migration_threshold) == (5, "lfu", 3)
    assert loaded.stats() == cache.stats()
    assert loaded.entry_stats() == cache.entry_stats()
    assert torch.equal(loaded.generate(model, PROMPT, **GREEDY), first)
    assert loaded.last_event["result"] == "hit"
    smaller = WaveGenCache.from_pretrained(str(tmp_path), max_entries=1)
    assert len(smaller) == 1


def test_loading_a_foreign_file_names_the_format(tmp_path):
    (tmp_path / CACHE_FILE).write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(ValueError, match="not a WaveGen cache of format 'reso_hf.wavegen_cache' version 1"):
        WaveGenCache.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no WaveGen cache"):
        WaveGenCache.from_pretrained(str(tmp_path / "missing"))


# ----- refusal of non-deterministic or unhashable calls -------------------------------------------------------------
def test_non_deterministic_decoding_is_refused():
    model = _SHARED["model"]
    cache = WaveGenCache()
    with pytest.raises(ValueError, match=r"do_sample=True is not deterministic.*pass seed=<int>"):
        cache.generate(model, PROMPT, max_new_tokens=3, do_sample=True)
    with pytest.raises(ValueError, match=r"logits_processor.*cannot be part of a WaveGen cache key"):
        cache.generate(model, PROMPT, max_new_tokens=3, logits_processor=[lambda ids, scores: scores])
    with pytest.raises(ValueError, match="return_dict_in_generate=True"):
        cache.generate(model, PROMPT, max_new_tokens=3, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="seed must be an int or None"):
        cache.generate(model, PROMPT, max_new_tokens=3, do_sample=True, seed="7")
    resonant = fresh_model(stochastic_resonance={"enabled": True})
    with pytest.raises(ValueError, match=r"stochastic_resonance.enabled \(noise\) is not deterministic"):
        cache.generate(resonant, PROMPT, max_new_tokens=3)
    torch.manual_seed(0)
    dropout = get_peft_model(fresh_model(), LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.1))
    dropout.train()
    with pytest.raises(ValueError, match=r"training mode with active dropout .*call model.eval\(\)"):
        cache.generate(dropout, PROMPT, max_new_tokens=3)
    assert cache.stats()["lookups"] == 0


def test_resonant_model_with_a_seed_is_cached_correctly():
    model = fresh_model(stochastic_resonance={"enabled": True, "escape_threshold": 0.0, "noise_amplitude": 2.0})
    cache = WaveGenCache()
    cache.generate(model, PROMPT, max_new_tokens=8, seed=5)
    hit = cache.generate(model, PROMPT, max_new_tokens=8, seed=5)
    assert cache.last_event["result"] == "hit"
    # a ResoLLM takes the seed for its stochastic-resonance noise: generate(seed=N), under torch.manual_seed(N)
    assert torch.equal(hit, fresh_generate(model, PROMPT, seed=5, generate_seed=5, max_new_tokens=8))


# ----- migration signal -------------------------------------------------------------------------------------------
class _Tokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"t{i}" for i in ids)


def test_frequent_entries_are_exported_as_sft_examples_then_evicted(tmp_path):
    model = _SHARED["model"]
    cache = WaveGenCache(migration_threshold=2, tokenizer=_Tokenizer())
    hot, cold = torch.tensor([[1, 20, 21]]), torch.tensor([[1, 30, 31]])
    output = cache.generate(model, hot, **GREEDY)
    cache.generate(model, cold, **GREEDY)
    cache.generate(model, hot, **GREEDY)
    assert cache.migration_candidates() == []
    cache.generate(model, hot, **GREEDY)
    assert [e.input_ids for e in cache.migration_candidates()] == [hot.tolist()]
    path = tmp_path / "migration.jsonl"
    assert cache.export_migration_dataset(str(path)) == 1
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["prompt_ids"] == hot[0].tolist()
    assert rows[0]["completion_ids"] == output[0, hot.shape[1]:].tolist()
    assert rows[0]["hits"] == 2
    assert rows[0]["text"] == _Tokenizer().decode(output[0].tolist())
    assert len(cache) == 1 and cache.stats()["migrated"] == 1
    cache.generate(model, hot, **GREEDY)
    assert cache.last_event["result"] == "miss"  # evicted after migration


def test_on_migrate_callback_receives_the_examples():
    model = _SHARED["model"]
    received = []
    cache = WaveGenCache(migration_threshold=1, on_migrate=received.extend)
    batch = torch.tensor([[1, 40, 41], [0, 1, 42]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    output = cache.generate(model, batch, attention_mask=mask, **GREEDY)
    cache.generate(model, batch, attention_mask=mask, **GREEDY)
    assert [row["prompt_ids"] for row in received] == [[1, 40, 41], [1, 42]]  # padding removed
    eos = model.generation_config.eos_token_id
    for row, example in enumerate(received):
        completion = output[row, 3:].tolist()
        if eos in completion:
            completion = completion[:completion.index(eos) + 1]
        assert example["completion_ids"] == completion
    assert len(cache) == 0 and cache.stats()["migrated"] == 1


# ----- command line -------------------------------------------------------------------------------------------------
def test_reso_hf_generate_with_cache(tmp_path, capsys):
    from reso_hf.cli import main as cli_main

    tokenizer = reso_hf.create_default_tokenizer()
    torch.manual_seed(0)
    reso_hf.ResoLLMForCausalLM(micro_config(vocab_size=259)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    command = ["generate", "--model", str(tmp_path / "model"), "--prompt", "Once", "--max_new_tokens", "4",
               "--cache", str(tmp_path / "cache")]
    assert cli_main(command + ["--greedy"]) == 0
    first = capsys.readouterr()
    assert cli_main(command + ["--greedy"]) == 0
    second = capsys.readouterr()
    assert "[wavegen] miss" in first.err and "[wavegen] hit (entries=1, hits=1, lookups=2)" in second.err
    assert first.out == second.out
    assert cli_main(command) == 2  # sampling without a seed
    assert "--cache caches only deterministic decoding" in capsys.readouterr().err


def test_resollm_goals_are_a_dependency():
    tokenizer = reso_hf.create_default_tokenizer()
    model = fresh_model(vocab_size=259, agency={"enabled": True})
    model.attach_tokenizer(tokenizer)
    cache = WaveGenCache()
    cache.generate(model, PROMPT, **GREEDY)
    assert "state" not in cache.entries[cache.last_event["key"]].dependencies
    model.create_goal("be concise", tokenizer=tokenizer)
    with_goal = cache.generate(model, PROMPT, **GREEDY)
    assert cache.last_event["result"] == "miss"  # a goal enters attention as a prefix slot: another configuration
    assert "state" in cache.entries[cache.last_event["key"]].dependencies
    assert torch.equal(with_goal, fresh_generate(model, PROMPT, **GREEDY))
