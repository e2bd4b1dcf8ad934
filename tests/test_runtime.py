"""ResoLLMInference (the seed's API), ResoAgentGroup and the chat session / CLI (SPEC §3.10, §3.11)."""

import copy
import dataclasses
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from reso_test_models import micro_config

import reso_hf
from reso_hf import GenerationResult, ResoAgentGroup, ResoLLMForCausalLM, ResoLLMInference
from reso_hf.cli import main as cli_main
from reso_hf.runtime.chat import ChatSession

SEED_RESULT_FIELDS = ("text", "tokens_generated", "stability", "lyapunov", "entropy_trace", "lyapunov_trace",
                      "temperature_trace", "coherence_trace", "goals_achieved", "attention_summary", "warnings",
                      "generation_time_ms")


@pytest.fixture(scope="module")
def tokenizer():
    return reso_hf.create_default_tokenizer()


def make_model(seed: int = 0, **overrides) -> ResoLLMForCausalLM:
    torch.manual_seed(seed)
    return ResoLLMForCausalLM(micro_config(vocab_size=259, **overrides)).eval()


@pytest.fixture(scope="module")
def model():
    return make_model()


def test_backbone_is_a_clear_error(tokenizer):
    backbone = reso_hf.ResoLLMModel(micro_config(vocab_size=259))
    with pytest.raises(TypeError, match="ResoLLMModel .*use ResoLLMForCausalLM"):
        ResoLLMInference(backbone, tokenizer, backbone.config)
    with pytest.raises(ValueError, match="tokenizer has 259 tokens but the model's vocab_size is 97"):
        ResoLLMInference(ResoLLMForCausalLM(micro_config()), tokenizer)


def test_generate_returns_every_seed_field(model, tokenizer):
    engine = ResoLLMInference(model, tokenizer, model.config)
    result = engine.generate("Once upon a time", max_length=12, seed=3)
    names = {f.name for f in dataclasses.fields(GenerationResult)}
    assert set(SEED_RESULT_FIELDS) <= names
    assert isinstance(result.text, str) and 1 <= result.tokens_generated <= 12
    for trace in (result.entropy_trace, result.lyapunov_trace, result.temperature_trace, result.coherence_trace):
        assert len(trace) == result.tokens_generated
    assert result.stability in ("collapsed", "stable", "critical", "divergent")
    assert result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True)
    again = engine.generate("Once upon a time", max_length=12, seed=3)
    assert again.token_ids == result.token_ids  # seeded sampling is reproducible
    greedy = engine.generate("Once upon a time", max_length=12, do_sample=False)
    ids = tokenizer("Once upon a time", return_tensors="pt")["input_ids"]
    expected = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=2)
    assert greedy.token_ids == expected[0, ids.shape[1]:ids.shape[1] + greedy.tokens_generated].tolist()
    with pytest.raises(ValueError, match="max_length=0 is invalid"):
        engine.generate("x", max_length=0)


def test_max_length_beyond_the_context_is_reduced_with_a_warning(tokenizer):
    small = make_model(max_position_embeddings=24)
    result = ResoLLMInference(small, tokenizer).generate("0123456789", max_length=50, do_sample=False)
    assert result.tokens_generated <= 14
    assert result.warnings[0]["type"] == "truncated_max_length"


def test_goal_errors(model, tokenizer):
    engine = ResoLLMInference(model, tokenizer)
    with pytest.raises(ValueError, match="goal_description='  ' is invalid"):
        engine.generate_with_goal("Explain", goal_description="  ", max_length=4)
    with pytest.raises(ValueError, match=r"create_goal\(\) needs agency.enabled=True"):
        engine.generate_with_goal("Explain", goal_description="be clear", max_length=4)


def test_goal_guided_generation_runs(tokenizer):
    model = make_model(agency={"enabled": True})
    result = ResoLLMInference(model, tokenizer).generate_with_goal(
        "Explain quantum computing", goal_description="Provide a clear, beginner-friendly explanation",
        max_length=6, do_sample=False)
    assert isinstance(result.goals_achieved, list)


def test_consensus_of_identical_agents_is_single_greedy(model, tokenizer):
    prompt = "Hello world"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    single = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    for count in (2, 3):
        agents = [copy.deepcopy(model) for _ in range(count)]
        results = ResoAgentGroup(agents, tokenizer).generate(prompt, strategy="consensus", max_new_tokens=16)
        assert len(results) == count
        stop = single.index(2) + 1 if 2 in single else len(single)
        assert results[0].token_ids == single[:stop]
        assert all(r.token_ids == results[0].token_ids for r in results)
        assert [r.agent for r in results] == [f"agent_{i}" for i in range(count)]
        assert len(results[1].entropy_trace) == results[1].tokens_generated


def test_consensus_is_the_normalised_geometric_mean(tokenizer):
    a, b = make_model(1), make_model(2)
    prompt = "abc"
    results = ResoAgentGroup([a, b], tokenizer).generate(prompt, strategy="consensus", max_new_tokens=5)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    for token in results[0].token_ids:
        with torch.no_grad():
            la = torch.log_softmax(a(ids).logits[0, -1], -1)
            lb = torch.log_softmax(b(ids).logits[0, -1], -1)
        assert int(torch.argmax(la + lb)) == token
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    # each agent reports the entropy of its own distribution
    assert results[0].entropy_trace != results[1].entropy_trace


def test_sampled_consensus_is_reproducible_with_a_seed(model, tokenizer):
    group = ResoAgentGroup([model, make_model(1)], tokenizer)
    runs = [group.generate("Hi", strategy="consensus", max_new_tokens=8, do_sample=True, temperature=0.9, top_k=20,
                           seed=4)[0].token_ids for _ in range(2)]
    assert runs[0] == runs[1]


def test_parallel_and_sequential(model, tokenizer):
    other = make_model(1)
    group = ResoAgentGroup([model, other], tokenizer, names=["alpha", "beta"])
    parallel = group.generate("Story:", strategy="parallel", max_new_tokens=6)
    assert [r.agent for r in parallel] == ["alpha", "beta"]
    engine = ResoLLMInference(other, tokenizer)
    assert parallel[1].token_ids == engine.generate("Story:", max_length=6, do_sample=False).token_ids
    sequential = group.generate("Story:", strategy="sequential", max_new_tokens=6)
    assert sequential[0].token_ids == parallel[0].token_ids
    continued = engine.generate("Story:" + sequential[0].text, max_length=6, do_sample=False)
    assert sequential[1].token_ids == continued.token_ids
    assert sequential[1].prompt == "Story:" + sequential[0].text


def test_multi_agent_through_the_engine_and_bad_input(model, tokenizer):
    engine_a = ResoLLMInference(model, tokenizer)
    engine_b = ResoLLMInference(make_model(1), tokenizer)
    results = engine_a.generate_multi_agent("Write a story about AI", other_agents=[engine_b],
                                            coordination_strategy="consensus", max_length=5, do_sample=False)
    assert len(results) == 2 and results[0].text == results[1].text
    with pytest.raises(ValueError, match=r"coordination_strategy='vote' is invalid: expected one of "
                                         r"\('parallel', 'sequential', 'consensus'\)"):
        engine_a.generate_multi_agent("x", other_agents=[engine_b], coordination_strategy="vote")
    with pytest.raises(ValueError, match=r"different vocabularies \(agent 0: vocab_size=259, agent 1: vocab_size=300\)"):
        ResoAgentGroup([model, ResoLLMForCausalLM(micro_config(vocab_size=300))], tokenizer)
    with pytest.raises(TypeError, match="models\\[1\\] is a ResoLLMModel"):
        ResoAgentGroup([model, reso_hf.ResoLLMModel(micro_config(vocab_size=259))], tokenizer)


def test_entangled_agents_are_named_by_node_id(tokenizer):
    agents = [make_model(i, entanglement={"enabled": True, "node_id": name}) for i, name in
              enumerate(["agent_alpha", "agent_beta"])]
    assert ResoAgentGroup(agents, tokenizer).names == ["agent_alpha", "agent_beta"]


def run_chat(engine, lines: str, show_metrics=True) -> str:
    out = io.StringIO()
    ChatSession(engine, show_metrics=show_metrics, max_new_tokens=5, input_stream=io.StringIO(lines),
                output_stream=out).run()
    return out.getvalue()


def test_chat_session_commands(tokenizer):
    engine = ResoLLMInference(make_model(5), tokenizer, do_sample=False)
    output = run_chat(engine, "status\nhello\nmetrics\nhello again\nmetrics\n\ngoal \nexit\nnever read\n")
    lines = output.splitlines()
    assert lines[0].startswith("ResoLLM chat. commands: exit | goal <description> | status | metrics")
    assert "model: ResoLLMForCausalLM" in output and "extensions: stability=off" in output
    assert "stability: 0.50 (critical, lambda=0.0000)" in output  # fresh model: no window yet
    answers = [i for i, line in enumerate(lines) if line.startswith("Assistant: ")]
    assert len(answers) == 2
    assert lines[answers[0] + 1].startswith("[metrics] stability=")  # metrics shown after the first answer
    assert "metrics display: off" in output and "metrics display: on" in output
    assert not lines[answers[1] + 1].startswith("[metrics]")  # ... and hidden after the toggle
    assert "error: goal_description='' is invalid" in output
    assert lines[-1] == "bye" and "never read" not in output


def test_chat_goal_command_without_agency_reports_the_config_field(model, tokenizer):
    output = run_chat(ResoLLMInference(model, tokenizer, do_sample=False), "goal be concise\nexit\n")
    assert "needs agency.enabled=True" in output


def test_chat_goal_command_with_agency(tokenizer):
    model = make_model(agency={"enabled": True})
    output = run_chat(ResoLLMInference(model, tokenizer, do_sample=False), "goal be concise\nhi\nstatus\nexit\n")
    assert "goal set: be concise" in output and "goals: be concise" in output


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("chat_model")
    model = make_model(stability={"enabled": True})
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_reso_hf_chat_through_stdin(checkpoint):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    completed = subprocess.run(
        [sys.executable, "-m", "reso_hf.cli", "chat", "--model", checkpoint, "--max_new_tokens", "4", "--greedy"],
        input="status\nmetrics\nhello\nmetrics\nhi\nexit\n", capture_output=True, text=True, env=env, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    output = completed.stdout
    assert "model: ResoLLMForCausalLM" in output and "stability=on" in output
    assert "metrics display: off" in output and "metrics display: on" in output
    assert output.count("Assistant: ") == 2 and output.count("[metrics] stability=") == 1
    assert output.rstrip().endswith("bye")


def test_reso_hf_generate(checkpoint, capsys):
    assert cli_main(["generate", "--model", checkpoint, "--prompt", "Once", "--max_new_tokens", "3", "--greedy",
                     "--metrics"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert '"stability":' in printed[-1] and '"tokens_generated":' in printed[-1]


def test_seed_readme_quick_start_and_stability_blocks(tokenizer):
    """The seed README's blocks with the import path changed and a tiny config."""
    from reso_hf import ResoLLMConfig, StabilityConfig, StochasticResonanceConfig, small_config

    config = small_config(vocab_size=259, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=256)
    model = ResoLLMForCausalLM(config)
    engine = ResoLLMInference(model, tokenizer, config)
    result = engine.generate("Once upon a time", max_length=10)
    assert f"Stability: {result.stability}" and f"Lyapunov: {result.lyapunov:.4f}"
    stability = model.get_stability()
    assert 0.0 <= stability <= 1.0
    suggested_temp = model.get_suggested_temperature(current_temp=0.7)
    assert config.stability.min_temperature <= suggested_temp <= config.stability.max_temperature
    assert isinstance(result.warnings, list)
    configured = ResoLLMConfig(
        dim=32, num_layers=2, num_heads=4, ffn_dim=64, vocab_size=259,
        stability=StabilityConfig(enabled=True, lyapunov_threshold=0.1, auto_temperature_adjust=True,
                                  predictive_horizon=5),
        stochastic_resonance=StochasticResonanceConfig(enabled=True, noise_amplitude=0.1),
    )
    result = ResoLLMInference(ResoLLMForCausalLM(configured), tokenizer, configured).generate("Hello", max_length=8)
    for name in SEED_RESULT_FIELDS:
        assert hasattr(result, name)


# ----------------------------------------------------------------------------- any causal LM, adapters


def greedy_ids(model, tokenizer, prompt: str, max_new_tokens: int) -> list:
    """Reference: `generate` called directly, cut after the first EOS."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id)
    new = output[0, ids.shape[1]:].tolist()
    return new[:new.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in new else new


def perturb_adapter(peft_model, seed: int) -> None:
    """Adapters start as a no-op (B = 0); random B factors make their effect visible in the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)


def test_engine_generates_with_any_causal_lm_and_reports_no_reso_telemetry(tokenizer):
    from tiny_gguf import tiny_llama

    llama = tiny_llama(len(tokenizer))
    engine = ResoLLMInference(llama, tokenizer, do_sample=False)
    result = engine.generate("Once upon a time", max_length=8)
    assert result.token_ids == greedy_ids(llama, tokenizer, "Once upon a time", 8)
    assert result.tokens_generated == len(result.token_ids) and result.text == tokenizer.decode(
        result.token_ids, skip_special_tokens=True)
    assert (result.stability, result.lyapunov, result.entropy_trace, result.coherence_trace) == (None, None, [], [])
    assert result.generation_time_ms > 0
    assert result.metrics_line() == (f"[metrics] tokens={result.tokens_generated} "
                                     f"time={result.generation_time_ms:.1f}ms warnings=0")
    sampled = [engine.generate("Hi", max_length=6, do_sample=True, seed=7).token_ids for _ in range(2)]
    assert sampled[0] == sampled[1]  # the seed seeds torch's sampling (there is no resonance noise to seed)
    with pytest.raises(ValueError, match="goals need a ResoLLM with agency.enabled=True; LlamaForCausalLM has none"):
        engine.create_goal("be brief")
    with pytest.raises(TypeError, match="model must be a causal LM that can generate .* got LlamaModel"):
        ResoLLMInference(llama.model, tokenizer)


def test_chat_with_a_llama_shows_what_it_has(tokenizer):
    from tiny_gguf import tiny_llama

    output = run_chat(ResoLLMInference(tiny_llama(len(tokenizer)), tokenizer, do_sample=False),
                      "status\nhello\ngoal be brief\nexit\n")
    lines = output.splitlines()
    assert lines[0] == "LlamaForCausalLM chat. commands: exit | goal <description> | status | metrics"
    assert lines[1].startswith("model: LlamaForCausalLM (") and "layers 2, hidden 32, vocab 259)" in lines[1]
    assert lines[2] == "stability, ResoLLM switches and goals: unavailable (the model is not a ResoLLM)"
    answer = next(i for i, line in enumerate(lines) if line.startswith("Assistant: "))
    assert lines[answer + 1].startswith("[metrics] tokens=") and "stability" not in lines[answer + 1]
    assert "error: goals need a ResoLLM with agency.enabled=True; LlamaForCausalLM has none" in output


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory, tokenizer):
    """A Llama folder, a plain LoRA adapter on it, and a DynamicLoRA adapter on a saved ResoLLM; with the
    in-memory models they were written from."""
    from peft import LoraConfig, get_peft_model
    from tiny_gguf import tiny_llama

    from reso_hf import DynamicLoraConfig

    root = tmp_path_factory.mktemp("folders")
    llama = tiny_llama(len(tokenizer))
    llama.save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    lora = get_peft_model(tiny_llama(len(tokenizer)), LoraConfig(task_type="CAUSAL_LM", r=4,
                                                                 target_modules=["q_proj", "v_proj"]))
    lora.peft_config["default"].base_model_name_or_path = str(root / "llama")
    perturb_adapter(lora, seed=1)
    lora.save_pretrained(root / "lora")  # no tokenizer in it: the base model's is used
    reso = make_model(3, stability={"enabled": True})
    reso.save_pretrained(root / "reso")
    tokenizer.save_pretrained(root / "reso")
    dynamic = get_peft_model(make_model(3, stability={"enabled": True}), DynamicLoraConfig(
        task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"],
        tier_ranks={"foundation": 4, "domain": 4, "swarm": 2, "agent": 2, "context": 2}))
    dynamic.peft_config["default"].base_model_name_or_path = str(root / "reso")
    perturb_adapter(dynamic, seed=2)
    dynamic.save_pretrained(root / "dynamic_lora")
    tokenizer.save_pretrained(root / "dynamic_lora")
    return root, {"llama": llama, "lora": lora.eval(), "dynamic_lora": dynamic.eval()}


@pytest.mark.parametrize("folder", ["llama", "lora", "dynamic_lora"])
def test_reso_hf_generate_takes_a_model_or_an_adapter_folder(folder, model_folders, tokenizer, capsys):
    root, models = model_folders
    assert cli_main(["generate", "--model", str(root / folder), "--prompt", "Once", "--max_new_tokens", "6",
                     "--greedy", "--metrics"]) == 0
    printed = capsys.readouterr().out.splitlines()
    metrics = json.loads(printed[-1])
    expected = greedy_ids(models[folder], tokenizer, "Once", 6)
    assert metrics["token_ids"] == expected
    if folder != "llama":  # the adapter changes the answer: it was loaded, not silently dropped
        base = models["llama"] if folder == "lora" else make_model(3, stability={"enabled": True})
        assert expected != greedy_ids(base, tokenizer, "Once", 6)
    if folder == "dynamic_lora":  # a ResoLLM under the adapter: its telemetry comes through
        assert metrics["stability"] in ("collapsed", "stable", "critical", "divergent")
        assert len(metrics["entropy_trace"]) == metrics["tokens_generated"]
    else:
        assert metrics["stability"] is None and metrics["entropy_trace"] == []


def test_reso_hf_chat_on_a_dynamic_lora_adapter_of_a_reso_llm_shows_its_telemetry(model_folders, capsys,
                                                                                    monkeypatch):
    root, _ = model_folders
    monkeypatch.setattr(sys, "stdin", io.StringIO("status\nhello\nexit\n"))
    assert cli_main(["chat", "--model", str(root / "dynamic_lora"), "--max_new_tokens", "3", "--greedy"]) == 0
    output = capsys.readouterr().out
    assert output.startswith("ResoLLM chat. commands:")
    assert "model: ResoLLMForCausalLM + DYNAMIC_LORA adapter (" in output and "extensions: stability=on" in output
    assert "[metrics] stability=" in output and output.rstrip().endswith("bye")
