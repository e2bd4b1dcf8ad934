"""v2 forward-pass extensions: PRSC concept bank, goals as prefix slots, Temporal SMF memory (SPEC §3.5-§3.7)."""

import math

import pytest
import torch
from reso_test_models import micro_config

import reso_hf
from reso_hf.modeling.primes import first_primes
from reso_hf.modeling.resonance import prime_phasor
from reso_hf.modeling.state_reso_llm import STATE_JSON_FILE, STATE_TENSORS_FILE

EXTENSIONS = dict(
    agency={"enabled": True, "max_goals": 3, "max_foci": 4},
    prsc={"enabled": True, "max_bindings": 8},
    temporal_smf={"enabled": True, "memory_decay_rate": 0.1, "max_moments": 4, "recall_k": 2},
)


@pytest.fixture(scope="module")
def tokenizer():
    return reso_hf.create_default_tokenizer()


def extended_model(tokenizer, seed=0, **overrides):
    torch.manual_seed(seed)
    model = reso_hf.ResoLLMForCausalLM(micro_config(vocab_size=len(tokenizer), **{**EXTENSIONS, **overrides}))
    model.attach_tokenizer(tokenizer)
    return model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_switched_off_extensions_add_no_parameters(tokenizer):
    plain = set(reso_hf.ResoLLMForCausalLM(micro_config(vocab_size=len(tokenizer))).state_dict())
    extended = set(extended_model(tokenizer).state_dict())
    added = extended - plain
    assert plain < extended
    assert {k.split(".")[-2] for k in added if "prefix" in k} == {"prefix_key_proj", "prefix_value_proj"}
    assert any(k.startswith("model.concept_bank.") for k in added)
    assert "memory_orientation.weight" in added
    only_agency = set(extended_model(tokenizer, prsc={"enabled": False}, temporal_smf={"enabled": False}).state_dict())
    assert not any("concept_bank" in k or "memory_orientation" in k for k in only_agency)


def test_goals_memories_and_bindings_keep_generation_causal_and_cache_consistent(tokenizer):
    model = extended_model(tokenizer)
    model.create_goal("Explain prime numbers simply", goal_type="exploratory")
    model.bind_concept("mathematics", token_id=42)
    model.update_memory("The user likes short answers.", importance=0.9)
    model.recall("How should I answer?")
    prompt = torch.tensor([tokenizer("Primes are")["input_ids"]])
    full = _logits(model, torch.cat([prompt, torch.tensor([[70, 71, 72, 73]])], dim=1))
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for token in (70, 71, 72, 73):
            out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.past_key_values
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=2e-5)

    cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    recomputed = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, recomputed)
    beams = dict(max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(model.generate(prompt, use_cache=True, **beams), model.generate(prompt, use_cache=False, **beams))

    changed = full.clone()
    ids = torch.cat([prompt, torch.tensor([[70, 71, 72, 73]])], dim=1)
    other = ids.clone()
    other[0, -2:] = torch.tensor([90, 91])
    changed = _logits(model, other)
    assert torch.allclose(changed[:, :-2], full[:, :-2], atol=1e-5)


def test_goal_and_memory_slots_change_the_output_and_reset_removes_them(tokenizer):
    model = extended_model(tokenizer)
    ids = torch.tensor([tokenizer("Hello there")["input_ids"]])
    before = _logits(model, ids)
    model.create_goal("Be brief")
    with_goal = _logits(model, ids)
    assert not torch.allclose(before, with_goal)
    model.reset_state()
    assert model.get_active_goals() == [] and torch.equal(_logits(model, ids), before)


def test_state_is_per_model_instance(tokenizer):
    first, second = extended_model(tokenizer), extended_model(tokenizer)
    first.create_goal("Write about the sea")
    first.update_memory("The sea is salty.", importance=1.0)
    assert second.get_active_goals() == [] and second.reso_state.memory.entries == []
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(_logits(second, ids), _logits(extended_model(tokenizer), ids))


def test_prime_binding_and_composition_follow_the_phasor_identity(tokenizer):
    model = extended_model(tokenizer)
    bank = model.model.concept_bank
    maths, logic = model.bind_concept("mathematics", token_id=42), model.bind_concept("logic", token_id=77)
    primes = first_primes(100)
    assert (maths.prime, logic.prime) == (primes[42], primes[77]) and (maths.slot, logic.slot) == (8, 9)
    composite = model.compose("mathematics", "logic")
    assert composite.prime == primes[42] * primes[77] and composite.name == "mathematics*logic"
    product_of_phasors = prime_phasor(primes[42], bank.code_dim // 2) * prime_phasor(primes[77], bank.code_dim // 2)
    with torch.no_grad():
        expected_key = bank.key_of_phasor(product_of_phasors).float()
    assert torch.allclose(composite.key, expected_key, atol=1e-5)
    assert torch.allclose(composite.value, maths.value + logic.value)
    bound = model.bind_concept("mathematical logic", concept=composite)
    assert bound.slot == 10 and len(model.reso_state.bindings) == 3

    ids = torch.tensor([[42, 77, 5]])
    model.reset_state()
    without = _logits(model, ids)
    model.bind_concept("mathematics", token_id=42)
    assert not torch.allclose(_logits(model, ids), without)


def test_memory_strength_decays_and_recall_ranks_by_cosine_times_strength(tokenizer):
    model = extended_model(tokenizer)
    store = model.reso_state.memory
    old = model.update_memory("Paris is the capital of France.", importance=1.0)
    for _ in range(5):
        store.advance(1)
    young = model.update_memory("Paris is the capital of France.", importance=0.5)
    assert young.created_at - old.created_at == 6
    assert math.isclose(store.strength(old), math.exp(-0.1 * 6))
    assert math.isclose(store.strength(young), 0.5)
    recalled = model.recall("Paris is the capital of France.", k=2)
    assert [entry for entry, _ in recalled] == [old, young]  # same text: cosine equal, exp(-0.6) > 0.5
    assert model.reso_state.memory_context == [old, young]
    assert set(old.axes()) and len(old.axes()) == 16 and all(-1 <= v <= 1 for v in old.axes().values())
    for i in range(5):
        model.update_memory(f"fact number {i}", importance=1.0)
    assert len(store.entries) == 4  # capacity: weakest evicted
    assert old not in store.entries


def test_memory_ages_with_generated_tokens(tokenizer):
    model = extended_model(tokenizer)
    model.update_memory("remember me", importance=1.0)
    step = model.reso_state.memory.step
    model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert model.reso_state.memory.step - step == 4  # the first token comes from the prompt pass


def test_goal_dropout_trains_the_goal_projections_and_prsc(tokenizer):
    model = extended_model(tokenizer, agency={"enabled": True, "goal_dropout": 1.0})
    model.train()
    ids = torch.tensor([tokenizer("### Human: Hi### Assistant: Hello there!")["input_ids"]] * 2)
    labels = ids.clone()
    labels[:, :12] = -100
    model(ids, labels=labels).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name in ("prefix_key_proj", "prefix_value_proj", "concept_bank.keys", "concept_bank.values",
                 "concept_bank.query", "concept_bank.output"):
        assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if name in n), name

    no_goal = extended_model(tokenizer, agency={"enabled": True, "goal_dropout": 0.0})
    no_goal.train()
    no_goal(ids, labels=labels).loss.backward()
    assert all(p.grad is None for n, p in no_goal.named_parameters() if "prefix_key_proj" in n)


def test_goal_telemetry_reports_progress_achievement_and_foci(tokenizer):
    model = extended_model(tokenizer, agency={"enabled": True, "max_foci": 3, "goal_coherence_threshold": 0.0})
    goal = model.create_goal("Talk about the weather", goal_type="task")
    prompt = torch.tensor([tokenizer("Weather today:")["input_ids"]])
    sequences = model.generate(prompt, max_new_tokens=6, do_sample=False)
    achieved, summaries = model.goal_telemetry(sequences, prompt.shape[1])
    assert achieved == [["Talk about the weather"]] and goal.achieved and 0 <= goal.progress <= 1
    foci = model.get_attention_foci()
    assert len(foci) == 3 and all(f.type == "token" for f in foci)
    assert [f.score for f in foci] == sorted((f.score for f in foci), reverse=True)
    for focus in foci:
        assert 0 <= focus.intensity <= 1 and 0 <= focus.relevance <= 1 and -1e-6 <= focus.novelty <= 2
        assert focus.target == int(sequences[0, focus.position])
    assert summaries[0]["goal_progress"] == {"Talk about the weather": pytest.approx(goal.progress)}
    assert 0 < summaries[0]["prefix_attention"] < 1
    assert model.get_active_goals() == []  # achieved goals leave the prefix


def test_state_round_trips_through_save_pretrained(tmp_path, tokenizer):
    model = extended_model(tokenizer)
    model.create_goal("Stay on topic", goal_type="constraint")
    model.bind_concept("music", token_id=50)
    model.update_memory("Bach wrote fugues.", importance=0.7)
    model.recall("fugues")
    model.save_pretrained(tmp_path / "with", save_memory=True)
    model.save_pretrained(tmp_path / "without")
    assert (tmp_path / "with" / STATE_TENSORS_FILE).is_file() and (tmp_path / "with" / STATE_JSON_FILE).is_file()
    assert not (tmp_path / "without" / STATE_JSON_FILE).exists()

    loaded = reso_hf.ResoLLMForCausalLM.from_pretrained(tmp_path / "with").eval()
    ids = torch.tensor([[5, 50, 9]])
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert [g.description for g in loaded.get_active_goals()] == ["Stay on topic"]
    assert torch.equal(loaded.get_active_goals()[0].vector, model.get_active_goals()[0].vector)
    assert loaded.reso_state.memory.step == model.reso_state.memory.step
    assert loaded.reso_state.bindings["music"].prime == model.reso_state.bindings["music"].prime
    fresh = reso_hf.ResoLLMForCausalLM.from_pretrained(tmp_path / "without").eval()
    assert fresh.get_active_goals() == [] and not torch.equal(_logits(fresh, ids), _logits(model, ids))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: m.create_goal("x", goal_type="dream"), r"goal_type='dream' is invalid: expected one of"),
        (lambda m: m.create_goal("   "), "goal description must be a non-empty string"),
        (lambda m: m.update_memory("x", importance=1.5), r"importance must be a number in \[0, 1\], got 1.5"),
        (lambda m: m.update_memory("x", importance=-0.1), r"importance must be a number in \[0, 1\]"),
        (lambda m: m.bind_concept("a", token_id=10_000), r"token_id=10000 is invalid"),
        (lambda m: m.compose("unbound", 3), r"concept 'unbound' is not bound"),
        (lambda m: m.recall("x", k=0), "k must be an int >= 1"),
    ],
)
def test_bad_input_raises_clear_errors(tokenizer, call, message):
    with pytest.raises(ValueError, match=message):
        call(extended_model(tokenizer))


def test_disabled_components_refuse_their_api(tokenizer):
    model = reso_hf.ResoLLMForCausalLM(micro_config(vocab_size=len(tokenizer)))
    model.attach_tokenizer(tokenizer)
    for call, component in ((lambda: model.create_goal("x"), "agency"), (lambda: model.bind_concept("a", 3), "prsc"),
                            (lambda: model.update_memory("x"), "temporal_smf")):
        with pytest.raises(ValueError, match=f"needs {component}.enabled=True"):
            call()


def test_too_many_goals_is_an_error(tokenizer):
    model = extended_model(tokenizer)
    for i in range(3):
        model.create_goal(f"goal {i}")
    with pytest.raises(ValueError, match="agency.max_goals=3 goals are already active"):
        model.create_goal("one more")


def test_entangled_agents_share_goals_and_memory(tokenizer):
    entangled = {"entanglement": {"enabled": True, "node_id": "a"}}
    first = extended_model(tokenizer, **entangled)
    second = extended_model(tokenizer, seed=1, entanglement={"enabled": True, "node_id": "b"})
    loner = extended_model(tokenizer, seed=2)
    reso_hf.ResoAgentGroup([first, second, loner], tokenizer)
    first.update_memory("The meeting is at noon.", importance=1.0)
    second.create_goal("Plan the meeting")
    assert second.reso_state is first.reso_state and loner.reso_state is not first.reso_state
    assert [e.text for e in second.reso_state.memory.entries] == ["The meeting is at noon."]
    assert [g.description for g in first.get_active_goals()] == ["Plan the meeting"]
    assert loner.get_active_goals() == [] and loner.reso_state.memory.entries == []
    second.reset_state()
    assert first.get_active_goals() == [] and second.reso_state is first.reso_state
