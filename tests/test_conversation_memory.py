"""Conversation memory layers (reso_hf.conversation_memory) and `reso-hf chat --memory`, on tiny random models."""

import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from reso_test_models import micro_config
from transformers import LlamaConfig, LlamaForCausalLM

import reso_hf
from reso_hf.cli import main as cli_main
from reso_hf.conversation_memory import ConversationMemory, recency_weights
from reso_hf.training.data import IGNORE_INDEX

TURNS = [("My cat is Pimble.", "Noted: your cat is called Pimble."),
         ("I live in Brindlemoor.", "Understood, you live in Brindlemoor."),
         ("My code is 4172.", "Got it, the code is 4172.")]


@pytest.fixture(scope="module")
def tokenizer():
    return reso_hf.create_default_tokenizer()


def tiny_llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def tiny_reso(vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    return reso_hf.ResoLLMForCausalLM(micro_config(vocab_size=vocab, max_position_embeddings=256)).eval()


def memory_for(tokenizer, tmp_path, model=None, **kwargs):
    settings = dict(steps_per_turn=3, lr=1e-2, rank=4, session="first")
    settings.update(kwargs)
    return ConversationMemory(model if model is not None else tiny_llama(len(tokenizer)), tokenizer, str(tmp_path),
                              **settings)


def logits(memory, text="### Human: where?### Assistant: Brindlemoor"):
    ids = memory.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return memory.model(input_ids=ids).logits


def test_recency_weights_values():
    assert recency_weights(3, 0.5) == [0.25, 0.5, 1.0]
    assert recency_weights(2, 1.0) == [1.0, 1.0]
    assert recency_weights(0, 0.8) == []
    with pytest.raises(ValueError, match=r"decay must be a number in \(0, 1\]"):
        recency_weights(2, 0.0)


def test_weighted_loss_is_the_recency_weighted_mean_of_the_turn_losses(tokenizer, tmp_path):
    memory = memory_for(tokenizer, tmp_path, decay=0.5)
    turns = [memory.encode_turn(u, a) for u, a in TURNS]
    with torch.no_grad():
        each = memory.turn_losses(turns)
        expected = (0.25 * each[0] + 0.5 * each[1] + 1.0 * each[2]) / 1.75
        torch.testing.assert_close(memory.weighted_loss(turns), expected)
        # one turn alone is its own mean loss on its labelled tokens
        ids, labels = turns[0]
        out = memory.model(input_ids=torch.tensor([ids])).logits[0, :-1]
        targets = torch.tensor(labels[1:])
        keep = targets != IGNORE_INDEX
        manual = torch.nn.functional.cross_entropy(out[keep], targets[keep])
        torch.testing.assert_close(each[0], manual)


def test_only_assistant_tokens_get_labels(tokenizer, tmp_path):
    memory = memory_for(tokenizer, tmp_path)
    ids, labels = memory.encode_turn("My cat is Pimble.", "Noted: Pimble.")
    labelled = tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert labelled == " Noted: Pimble.<|eos|>"  # the generation prompt ends at "### Assistant:"
    assert all(label == IGNORE_INDEX for label in labels[:len(tokenizer("### Human: My cat is Pimble.### Assistant:",
                                                                     add_special_tokens=False)["input_ids"])])


@pytest.mark.parametrize("kind", ["lora", "dynamic_lora"])
def test_observe_turn_lowers_the_turn_loss_and_trains_only_the_memory(tokenizer, tmp_path, kind):
    memory = memory_for(tokenizer, tmp_path, adapter_type=kind)
    base = {n: p.detach().clone() for n, p in memory.model.named_parameters() if ".memory." not in n}
    turn = memory.encode_turn(*TURNS[0])
    with torch.no_grad():
        before = float(memory.turn_losses([turn])[0])
    stats = memory.observe_turn(*TURNS[0])
    with torch.no_grad():
        after = float(memory.turn_losses([turn])[0])
    assert stats["loss_before"] == pytest.approx(before) and stats["loss_after"] == pytest.approx(after)
    assert after < before - 0.05
    assert memory.loss_reduction == pytest.approx(before - after)
    for name, parameter in memory.model.named_parameters():
        if name in base:
            assert torch.equal(parameter, base[name]), name
    with memory.disabled():  # the base model is unchanged
        with torch.no_grad():
            assert float(memory.turn_losses([turn])[0]) == pytest.approx(before, abs=0.2)


@pytest.mark.parametrize("kind", ["lora", "dynamic_lora"])
def test_layers_puts_the_memory_on_the_last_layers_only(tokenizer, tmp_path, kind):
    memory = memory_for(tokenizer, tmp_path, adapter_type=kind, layers=1)
    names = [n for n, _ in memory.model.named_parameters() if ".memory." in n]
    assert names and all(".layers.1." in n for n in names)
    stats = memory.observe_turn(*TURNS[0])
    assert stats["loss_after"] < stats["loss_before"]


def test_memory_on_a_model_with_a_lora_adapter_keeps_it_active_and_frozen(tokenizer, tmp_path):
    model = get_peft_model(tiny_llama(len(tokenizer)), LoraConfig(r=2, target_modules=["q_proj"]),
                           adapter_name="skill")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B.skill" in name:
                parameter.normal_(0, 0.5)
    skill = {n: p.detach().clone() for n, p in model.named_parameters() if ".skill." in n}
    reference = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    memory = memory_for(tokenizer, tmp_path, model=model)
    assert memory.model is model and memory.others == ["skill"] and memory.adapter_type == "lora"
    torch.testing.assert_close(logits(memory, "abc"), model(input_ids=tokenizer("abc", return_tensors="pt")
                                                            ["input_ids"]).logits)
    memory.observe_turn(*TURNS[0])
    assert sorted(model.active_adapters) == ["memory", "skill"]
    for name, parameter in model.named_parameters():
        if name in skill:
            assert torch.equal(parameter, skill[name])
    with memory.disabled():
        torch.testing.assert_close(model(input_ids=torch.tensor([[5, 6, 7]])).logits, reference)
    with pytest.raises(ValueError, match="PEFT cannot mix adapter types"):
        ConversationMemory(model, tokenizer, str(tmp_path), adapter_type="dynamic_lora", adapter_name="other")
    # a second memory on the last layer's q_proj, which already carries both adapters
    recent = ConversationMemory(model, tokenizer, str(tmp_path), adapter_name="recent", layers=1,
                                target_modules=["q_proj"])
    assert recent.target_modules == ["model.layers.1.self_attn.q_proj"]
    assert [n for n, _ in model.named_parameters() if ".recent." in n] == [
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.recent.weight",
        "base_model.model.model.layers.1.self_attn.q_proj.lora_B.recent.weight"]


@pytest.mark.parametrize("kind,model_fn", [("lora", tiny_llama), ("dynamic_lora", tiny_llama), ("lora", tiny_reso)])
def test_save_load_round_trip_gives_identical_logits(tokenizer, tmp_path, kind, model_fn):
    memory = memory_for(tokenizer, tmp_path, model=model_fn(len(tokenizer)), adapter_type=kind)
    for turn in TURNS[:2]:
        memory.observe_turn(*turn)
    trained = logits(memory)
    folder = memory.save()
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors", "memory.json"]
    manifest = json.loads(open(os.path.join(folder, "memory.json")).read())
    assert manifest["turns"] == 2 and manifest["session"] == "first" and manifest["adapter_type"] == kind
    assert len(manifest["centroid"]) == memory.model.get_input_embeddings().weight.shape[1]
    assert manifest["importance"] == pytest.approx(memory.loss_reduction) and manifest["uses"] == 0
    assert manifest["created"] <= manifest["updated"]

    memory.new_session("second")
    assert not torch.equal(logits(memory), trained)
    memory.load("first")
    torch.testing.assert_close(logits(memory), trained, rtol=0, atol=0)
    assert memory.turn_count == 2 and memory.uses == 1 and memory.session == "first"
    assert memory.read_manifest("first")["importance"] == pytest.approx(2 * memory.loss_reduction)

    # a fresh process's view: another model object with the same base weights
    fresh = ConversationMemory(model_fn(len(tokenizer)), tokenizer, str(tmp_path), rank=4, adapter_type=kind,
                               session="other", seed=7)
    fresh.load("first", count_use=False)
    torch.testing.assert_close(logits(fresh), trained, rtol=0, atol=0)


def test_a_session_folder_is_a_plain_peft_adapter(tokenizer, tmp_path):
    memory = memory_for(tokenizer, tmp_path)
    memory.observe_turn(*TURNS[0])
    trained = logits(memory)
    loaded = PeftModel.from_pretrained(tiny_llama(len(tokenizer)), memory.save()).eval()
    ids = tokenizer("### Human: where?### Assistant: Brindlemoor", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained)


def test_prune_keeps_the_most_important_layers(tokenizer, tmp_path):
    memory = memory_for(tokenizer, tmp_path, steps_per_turn=1, max_layers=2)
    for name, reduction in [("a", 0.3), ("b", 0.9), ("c", 0.1), ("d", 0.5)]:
        memory.new_session(name)
        memory.observe_turn(*TURNS[0])
        memory.loss_reduction = reduction  # importance = reduction * (1 + uses)
        memory.save()
    assert memory.sessions() == ["a", "b", "c", "d"]
    assert memory.prune() == ["a", "c"]
    assert memory.sessions() == ["b", "d"] and sorted(os.listdir(tmp_path)) == ["b", "d"]
    memory.load("d")  # one use doubles d's importance: 1.0 > 0.9
    assert memory.prune(max_layers=1) == ["b"] and memory.sessions() == ["d"]


def test_retrieve_picks_the_layer_whose_centroid_matches(tokenizer, tmp_path):
    memory = memory_for(tokenizer, tmp_path, steps_per_turn=1)
    topics = {"pets": ("Tell me about cats and kittens.", "Cats and kittens purr."),
              "numbers": ("0123 4567 8901?", "2345 6789 0123.")}
    for name, turn in topics.items():
        memory.new_session(name)
        memory.observe_turn(*turn)
        memory.save()
    assert memory.retrieve("kittens and cats")[0][0] == "pets"
    assert memory.retrieve("9876 5432")[0][0] == "numbers"
    ranked = memory.retrieve("cats", top_k=1)
    assert len(ranked) == 1 and -1 <= ranked[0][1] <= 1


def test_bad_arguments_are_clear_errors(tokenizer, tmp_path):
    model = tiny_llama(len(tokenizer))
    for kwargs, message in [({"steps_per_turn": 0}, "steps_per_turn must be an int >= 1, got 0"),
                            ({"lr": -1.0}, "lr must be a finite number > 0, got -1.0"),
                            ({"decay": 1.5}, r"decay must be a number in \(0, 1\]"),
                            ({"rank": 1.5}, "rank must be an int >= 1"),
                            ({"adapter_type": "ia3"},
                             r"adapter_type must be one of \['auto', 'lora', 'dynamic_lora'\]"),
                            ({"session": "../escape"}, "session must be 1-128 characters"),
                            ({"chat_template": "jinja"}, "chat_template must be one of"),
                            ({"adapter_name": "my.memory"}, "adapter_name must be a Python identifier"),
                            ({"layers": 0}, r"layers=0 must be between 1 and the model's num_hidden_layers \(2\)"),
                            ({"layers": [0, 2]}, r"layers must be decoder layer indices in \[0, 2\), got \[0, 2\]")]:
        with pytest.raises(ValueError, match=message):
            ConversationMemory(model, tokenizer, str(tmp_path), **kwargs)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        ConversationMemory(model, tokenizer, str(tmp_path / "file"))
    memory = memory_for(tokenizer, tmp_path / "mem", model=model)
    with pytest.raises(ValueError, match="assistant must be a non-empty str"):
        memory.observe_turn("hi", "  ")
    with pytest.raises(ValueError, match="nothing to save"):
        memory.save()
    with pytest.raises(ValueError, match=r"no memory layer 'missing' .* saved sessions: \[\]"):
        memory.load("missing")
    memory.observe_turn(*TURNS[0])
    memory.save()
    other = ConversationMemory(tiny_llama(len(tokenizer)), tokenizer, str(tmp_path / "mem"), rank=2)
    with pytest.raises(ValueError, match="'first' is a lora adapter of rank 4; this memory uses lora of rank 2"):
        other.load("first")
    path = tmp_path / "mem" / "first" / "memory.json"
    path.write_text(json.dumps({"format": "something", "version": 1}))
    with pytest.raises(ValueError, match="is not a memory manifest of version 1"):
        memory.load("first")


def test_a_failed_save_leaves_the_previous_layer_intact(tokenizer, tmp_path, monkeypatch):
    memory = memory_for(tokenizer, tmp_path)
    memory.observe_turn(*TURNS[0])
    folder = memory.save()
    saved = {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}
    memory.observe_turn(*TURNS[1])

    def broken(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr("reso_hf.dynamic_lora.serialization.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        memory.save()
    assert sorted(os.listdir(folder)) == sorted(saved)  # no temporary file left behind
    assert {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)} == saved
    assert memory.read_manifest("first")["turns"] == 1


def chat_lines(engine_model, tokenizer, memory, lines, **kwargs):
    from reso_hf.runtime.chat import ChatSession
    from reso_hf.runtime.inference import ResoLLMInference

    out = io.StringIO()
    engine = ResoLLMInference(engine_model, tokenizer, do_sample=False)
    ChatSession(engine, max_new_tokens=4, input_stream=io.StringIO(lines), output_stream=out, memory=memory,
                **kwargs).run()
    return out.getvalue()


def test_chat_session_recalls_the_closest_layer(tokenizer, tmp_path):
    memory = memory_for(tokenizer, tmp_path, model=tiny_reso(len(tokenizer)), steps_per_turn=1, session="cats")
    output = chat_lines(memory.model, tokenizer, memory, "kittens and cats\ncats purr\nmemory\nexit\n")
    assert "[memory] new session cats" in output
    assert "[memory] session cats, turn 2: assistant loss" in output
    assert "memory: session cats, 2 turns" in output and "1 saved layer in" in output
    memory.new_session("numbers")
    output = chat_lines(memory.model, tokenizer, memory, "123 456 789\nexit\n", memory_min_similarity=0.99)
    assert "[memory] new session numbers; closest cosine" in output
    memory.new_session("later")
    output = chat_lines(memory.model, tokenizer, memory, "cats and kittens\nexit\n", memory_min_similarity=0.3)
    assert "[memory] recalled session cats (cosine" in output
    assert "[memory] session cats, turn 3:" in output and memory.read_manifest("cats")["uses"] == 1


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("memory_chat_model")
    tiny_reso(len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_reso_hf_chat_with_memory_through_stdin(checkpoint, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    memory_dir = tmp_path / "memories"
    command = [sys.executable, "-m", "reso_hf.cli", "chat", "--model", checkpoint, "--max_new_tokens", "4",
               "--greedy", "--no_metrics", "--memory", str(memory_dir), "--memory_session", "talk",
               "--memory_steps", "2", "--memory_rank", "2"]
    completed = subprocess.run(command, input="hello there\nmemory\nhow are you\nexit\n", capture_output=True,
                               text=True, env=env, timeout=120)
    assert completed.returncode == 0, completed.stderr
    output = completed.stdout
    assert "commands: exit | goal <description> | status | metrics | memory" in output
    assert output.count("Assistant: ") == 2
    assert "[memory] session talk, turn 1: assistant loss" in output
    assert "[memory] session talk, turn 2: assistant loss" in output
    manifest = json.loads((memory_dir / "talk" / "memory.json").read_text())
    assert manifest["turns"] == 2 and manifest["rank"] == 2 and manifest["training"]["steps_per_turn"] == 2
    assert sorted(os.listdir(memory_dir / "talk")) == ["adapter_config.json", "adapter_model.safetensors",
                                                       "memory.json"]


def test_reso_hf_chat_memory_flags_are_checked(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("exit\n"))
    for flags, message in [(["--memory_session", "x"], "--memory_session needs --memory DIR"),
                           (["--memory", str(tmp_path), "--memory_lr", "0"], "--memory_lr must be > 0, got 0.0"),
                           (["--memory", str(tmp_path), "--memory_decay", "2"], r"--memory_decay must be in \(0, 1\]"),
                           (["--memory", str(tmp_path), "--memory_steps", "0"], "--memory_steps must be >= 1, got 0"),
                           (["--memory", str(tmp_path), "--memory_session", "a/b"],
                            "--memory_session: session must be 1-128 characters")]:
        assert cli_main(["chat", "--model", checkpoint, *flags]) == 2
        assert re.search(message, capsys.readouterr().err), message



def test_memory_layers_benchmark_quick_on_a_tiny_model(tokenizer, tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
    import memory_layers

    from reso_hf.training.data import bundled_sample_path

    session = memory_layers.make_session(3, 1, ["town", "number"])
    assert len(session["turns"]) == 2 and len(session["questions"]) == 4
    statements = " ".join(a for _, a in session["turns"])
    for user, answer, value in session["questions"]:
        assert value in answer and value in statements and answer not in statements  # paraphrased
    memory = memory_for(tokenizer, tmp_path / "m")
    ids, labels = memory_layers.value_rows(memory, session["questions"][:1])[0]
    assert tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX]).strip() == \
        session["questions"][0][2]

    model_dir = tmp_path / "tiny"
    tiny_llama(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    report = memory_layers.main(["--quick", "--model", str(model_dir), "--probe-data", bundled_sample_path(),
                                 "--layers", "1", "--threads", "1", "--out", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["test"]["sessions"][0]["answer_loss_memory"] == report["test"]["sessions"][0]["answer_loss_memory"]
    assert saved["dev"]["chosen"] == {"steps_per_turn": 2, "lr": 3e-3} and (tmp_path / "out.png").stat().st_size > 0
    assert 0 <= saved["test"]["retrieval_top1"] <= 1 and saved["probe_rows"] == 4
