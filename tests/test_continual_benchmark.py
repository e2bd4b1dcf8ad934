"""The pure parts of benchmarks/continual.py (the language rule, the metrics, the splits, combining runs, the plots)
and the per-module cosines of benchmarks/continual_resonance.py."""

import argparse
import random
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import continual  # noqa: E402


@pytest.mark.parametrize(
    "text, language",
    [
        ("What is the best way to learn the guitar? You should practice every day and it will be fine.", "english"),
        ("¿Cómo puedo aprender a tocar la guitarra? Es muy fácil si practicas todos los días con una rutina.",
         "spanish"),
        ("Как научиться играть на гитаре? Нужно заниматься каждый день.", "russian"),
        ("Comment apprendre la guitare? Il faut pratiquer tous les jours avec une routine qui est simple.", "other"),
        ("12345 67890", "other"),
    ],
)
def test_detect_language_follows_the_documented_rule(text, language):
    assert continual.detect_language(text) == language


def test_metrics_of_a_known_matrix():
    # rows: before training, after task 0, after task 1, after task 2; columns: tasks 0..2
    matrix = [
        [3.0, 3.0, 3.0],
        [2.0, 2.8, 2.9],
        [2.5, 2.0, 2.7],
        [2.6, 2.2, 1.5],
    ]
    metrics = continual.summarise(matrix, adaptation=[4, 6, 8])
    # task 0: best 2.0 (after task 0), final 2.6 -> 0.6; task 1: best 2.0, final 2.2 -> 0.2
    assert metrics["avg_forgetting"] == pytest.approx(0.4)
    assert metrics["bwt"] == pytest.approx(((2.0 - 2.6) + (2.0 - 2.2)) / 2)
    assert metrics["fwt"] == pytest.approx(((3.0 - 2.8) + (3.0 - 2.7)) / 2)
    # retention: share of the gain kept, (3 - 2.6) / (3 - 2) = 0.4 and (3 - 2.2) / (3 - 2) = 0.8
    assert metrics["retention_per_task"] == pytest.approx([0.4, 0.8])
    assert metrics["final_avg_loss"] == pytest.approx((2.6 + 2.2 + 1.5) / 3)
    assert metrics["new_task_gain"] == pytest.approx(1.5)
    assert metrics["avg_adaptation_steps"] == pytest.approx(6.0)


def test_steps_to_95_finds_the_first_step_within_5_percent_of_the_drop():
    assert continual.steps_to_95([4.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], ema=0.0) == 2
    assert continual.steps_to_95([1.0, 2.0, 3.0]) == 3  # no improvement: the whole budget


def _args(**overrides):
    values = dict(held_out_fraction=0.2, seed=0, split="held_out")
    values.update(overrides)
    return argparse.Namespace(**values)


def test_dev_split_is_carved_out_of_train_and_never_touches_held_out():
    items = list(range(100))
    train, held_out = continual.train_and_evaluation_parts(items, _args())
    dev_train, dev = continual.train_and_evaluation_parts(items, _args(split="dev"))
    assert len(held_out) == 20 and len(dev) == 16
    assert set(dev) | set(dev_train) == set(train)
    assert not set(dev) & set(dev_train)
    assert not (set(dev) | set(dev_train)) & set(held_out)


def test_reuse_takes_finished_methods_only_from_runs_with_the_same_settings(tmp_path):
    settings = {key: 1 for key in continual.FINGERPRINT} | {"split": "held_out", "low_lr_scale": 0.78}
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"settings": settings, "results": {"plain_lora": {"x": 1}, "lora_low_lr": {"x": 2}}}))
    assert continual.reused_results([earlier], settings, ["plain_lora"]) == {"plain_lora": {"x": 1}}
    # a method-specific setting only matters for that method
    other_scale = settings | {"low_lr_scale": 0.5}
    assert continual.reused_results([earlier], other_scale, ["plain_lora"]) == {"plain_lora": {"x": 1}}
    with pytest.raises(ValueError, match=r"lora_low_lr ran with other settings .*'low_lr_scale': \(0.78, 0.5\)"):
        continual.reused_results([earlier], other_scale, ["lora_low_lr"])
    with pytest.raises(ValueError, match=r"plain_lora ran with other settings .*'steps': \(1, 2\)"):
        continual.reused_results([earlier], settings | {"steps": 2}, ["plain_lora"])


def test_every_dynamic_variant_builds_a_valid_config():
    args = argparse.Namespace(tier_ranks=dict(continual.COMPACT_RANKS), autocorr_window=3, steps=16)
    first_release = continual.dynamic_config(args, "dynamic_v1")
    assert all(first_release.scaling_of(t) == 1.0 for t in first_release.tiers)
    assert not first_release.decay_follows_inertia and first_release.density_gradient == "factors"
    current = continual.dynamic_config(args, "dynamic_on")
    assert current.scaling_of("context") == 16.0 and current.scaling_of("foundation") == 1.0
    unthrottled = continual.dynamic_config(args, "dynamic_migration_unthrottled")
    sources = [t for t in unthrottled.tiers if t != "foundation"]  # every tier but the slowest feeds a channel
    assert [unthrottled.bandwidth_of(t) for t in sources] == [1.0] * 4
    assert [current.bandwidth_of(t) for t in sources] != [1.0] * 4  # the default stays SPEC 5.5's
    for variant in continual.DYNAMIC_VARIANTS:
        assert continual.dynamic_config(args, variant).total_rank == 31
    # issue 20: the budget-scaled variants take the per-task step budget as their horizon (window 16 // 5 = 3)
    horizon = continual.dynamic_config(args, "dynamic_consolidate_horizon")
    assert horizon.dynamics_horizon == 16 and horizon.effective_autocorr_window == 3
    assert continual.dynamic_config(args, "dynamic_consolidate_column").protected_subspace == "column"
    assert set(continual.CONSOLIDATING_VARIANTS) <= set(continual.ALL_METHODS)
    fast = continual.dynamic_config(args, "dynamic_consolidate_m1_fast")
    assert fast.memory_tiers == ["foundation"]
    assert fast.inertia_of("foundation") == 0.99 and [fast.inertia_of(t) for t in fast.fast_tiers] == [0.0] * 4


def test_task_order_permutes_the_tasks_and_rejects_anything_but_a_permutation():
    tasks = [{"name": name} for name in ("english", "spanish", "russian", "other", "shakespeare")]
    assert continual.ordered(tasks, None) == tasks
    order = ["shakespeare", "other", "russian", "spanish", "english"]
    assert [t["name"] for t in continual.ordered(tasks, order)] == order
    with pytest.raises(ValueError, match=r"--task-order must name each task exactly once.*got \['english', 'english'"):
        continual.ordered(tasks, ["english", "english", "russian", "other", "shakespeare"])
    with pytest.raises(ValueError, match=r"the tasks are \['english', 'spanish', 'russian', 'other', 'shakespeare'\]"):
        continual.ordered(tasks, ["english"])
    # runs without an order combine with earlier results, which did not record one
    assert "task_order" in continual.FINGERPRINT
    assert continual.fingerprint({}, "plain_lora")["task_order"] is None


def test_trade_off_plot_tells_every_method_apart(tmp_path):
    names = continual.ALL_METHODS
    many = continual.method_styles([f"method_{i}" for i in range(140)])
    assert len({(tuple(color), marker) for color, marker in many.values()}) == 140
    # coinciding points (as dynamic_on and its variants are) still draw: the legend carries the names
    results = {name: {"avg_adaptation_steps": 8.0, "avg_forgetting": 0.095, "new_task_gain": 0.25} for name in names}
    continual.plot_tradeoff(results, tmp_path / "tradeoff.png", "test")
    assert (tmp_path / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resonance_diagnostic_reproduces_the_tuners_vertical_cosine():
    import continual_resonance
    import torch
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import reso_hf

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    config = reso_hf.DynamicLoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"],
                                       tier_ranks={"foundation": 4, "domain": 4, "swarm": 2, "agent": 2, "context": 1})
    model = get_peft_model(base, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        model.base_model.dynamic_step(optimizer)
        measured = continual_resonance.module_cosines(model)  # the tuner's own per-module cosines of this step
        optimizer.zero_grad(set_to_none=True)
    states = model.base_model.dynamics().tier_states
    assert set(measured) == {"foundation->domain", "domain->swarm", "swarm->agent", "agent->context"}
    for pair, values in measured.items():
        assert len(values) == 4  # two layers x (q_proj, v_proj), every slow tier non-zero after the first step
        assert sum(values) / len(values) == pytest.approx(states[pair.split("->")[1]].vertical, abs=1e-12)
    summary = continual_resonance.summarise_pair([[0.2, -0.4], [0.6]], conflict=0.3, vertical=0.5)
    assert summary["tuner_mean_min"] == pytest.approx(-0.1) and summary["tuner_mean_max"] == pytest.approx(0.6)
    assert summary["module_share_conflict"] == pytest.approx(1 / 3) and summary["module_share_aligned"] == pytest.approx(1 / 3)
    assert summary["module_abs_max"] == pytest.approx(0.6)


def test_consolidating_methods_consolidate_at_each_task_boundary_but_the_last():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    for p in base.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)

    def docs(count):
        return [(ids, list(ids)) for ids in torch.randint(1, 61, (count, 10), generator=generator).tolist()]

    tasks = [{"name": name, "train": docs(4), "held_out": docs(2)} for name in ("a", "b", "c")]
    args = argparse.Namespace(seed=0, steps=2, batch=2, lr=1e-3, full_ft_lr=1e-5, low_lr_scale=0.5, eval_batch=2,
                              log_every=1, tier_ranks=dict(continual.COMPACT_RANKS), autocorr_window=2)
    result = continual.run_method("dynamic_consolidate_column", base, tasks, args, pad_id=0, total_rank=31)
    consolidations = [e for e in result["dynamics"] if "consolidation" in e]
    assert [e["task"] for e in consolidations] == ["a", "b"]
    assert all(e["consolidation"]["truncation_error"] >= 0.0 for e in consolidations)
    assert result["dynamics"][-1]["counters"]["consolidations"] == 2


# ----------------------------------------------------------------------------------------------------------
# The baselines of issue 20 (O-LoRA, EWC on LoRA, experience replay) on a tiny random Llama


def _tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _tiny_tasks(sizes=(40, 60, 20)):
    import random

    rng = random.Random(0)
    tasks = []
    for i, size in enumerate(sizes):
        def docs(n, tag):
            # the first token tells examples apart: train docs start with tag 1, held-out ones with tag 2
            return [([tag, i + 3] + [rng.randrange(5, 61) for _ in range(6)],) * 2 for _ in range(n)]
        tasks.append({"name": f"t{i}", "train": docs(size, 1), "held_out": docs(3, 2)})
    return tasks


def _baseline_args(**overrides):
    values = dict(seed=0, lr=1e-2, full_ft_lr=1e-4, low_lr_scale=0.5, eval_batch=4, steps=3, batch=4, log_every=1,
                  olora_lambda=0.5, ewc_lambda=1e4, ewc_fisher_examples=4, replay_fraction=0.05, replay_share=0.25)
    values.update(overrides)
    return argparse.Namespace(**values)


def test_olora_splits_the_total_rank_across_tasks():
    assert continual.split_rank(31, 5) == [7, 6, 6, 6, 6]
    assert continual.split_rank(4, 2) == [2, 2]
    with pytest.raises(ValueError, match=r"total_rank \(2\) must be at least the number of tasks \(3\)"):
        continual.split_rank(2, 3)


def test_olora_penalty_is_zero_for_orthogonal_subspaces_and_positive_otherwise():
    import torch

    tasks = _tiny_tasks((8, 8))
    olora = continual.OLora(_baseline_args(), total_rank=5, tasks=tasks)
    model = olora.wrap(_tiny_llama())
    assert olora.ranks == [3, 2]
    # the whole budget is reported: as many adapter parameters as one LoRA of the total rank
    plain = continual.ContinualBaseline(_baseline_args(), 5, tasks)
    assert olora.adapter_params(model) == plain.adapter_params(plain.wrap(_tiny_llama()))
    model = olora.start_task(model, 1)
    eye = torch.eye(32)
    layers = continual.lora_layers(model)
    assert len(layers) == 8  # 2 layers x q, k, v, o
    with torch.no_grad():
        for layer in layers:
            layer.lora_A["task_0"].weight.copy_(eye[:3])
            layer.lora_A["task_1"].weight.copy_(eye[3:5])
    assert float(continual.olora_penalty(model, ["task_0"], "task_1")) == 0.0
    assert float(olora.penalty(model, 1)) == 0.0
    with torch.no_grad():
        for layer in layers:
            layer.lora_A["task_1"].weight[0] = 2 * eye[1]  # overlaps task_0's second direction
    # per module (A_old A_new^T)[1, 0] = 2 -> 4; 8 modules; times lambda 0.5
    assert float(continual.olora_penalty(model, ["task_0"], "task_1")) == pytest.approx(32.0)
    assert float(olora.penalty(model, 1)) == pytest.approx(16.0)
    assert olora.penalty(model, 0) is None  # the first task has no earlier subspace


def test_olora_keeps_earlier_adapters_active_and_frozen():
    import torch

    olora = continual.OLora(_baseline_args(), total_rank=6, tasks=_tiny_tasks())
    model = olora.start_task(olora.wrap(_tiny_llama()), 0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".task_0." in n for n in trainable)
    model = olora.start_task(model, 2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".task_2." in n for n in trainable)
    assert model.base_model.active_adapters == ["task_0", "task_1", "task_2"]
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    before = model(input_ids=ids).logits
    with torch.no_grad():
        for layer in continual.lora_layers(model):
            layer.lora_B["task_0"].weight.fill_(0.1)  # a frozen earlier adapter still acts on the output
    assert not torch.allclose(model(input_ids=ids).logits, before)


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_with_the_fisher_weighted_distance():
    import torch

    tasks = _tiny_tasks((8, 8, 8))
    ewc = continual.EwcLora(_baseline_args(ewc_lambda=3.0), total_rank=2, tasks=tasks)
    model = ewc.start_task(ewc.wrap(_tiny_llama()), 0)
    assert ewc.penalty(model, 0) is None  # nothing consolidated yet
    with torch.no_grad():
        for layer in continual.lora_layers(model):
            layer.lora_B["default"].weight.normal_()  # B = 0 at initialisation would give A no gradient
    model = ewc.end_task(model, 0, tasks[0], pad_id=0)
    assert float(ewc.penalty(model, 1)) == 0.0  # theta* is the current weights
    first = dict(ewc.fisher)
    assert all(bool((f >= 0).all()) for f in first.values()) and sum(float(f.sum()) for f in first.values()) > 0
    # the Fisher is the mean of per-example squared gradients
    name = next(iter(first))
    parameter = dict(model.named_parameters())[name]
    docs = random.Random(0).sample(tasks[0]["train"], 4)
    squares = []
    for doc in docs:
        model.zero_grad(set_to_none=True)
        model(**continual.collate([doc], 0)).loss.backward()
        squares.append(parameter.grad.pow(2))
    model.zero_grad(set_to_none=True)
    assert torch.allclose(first[name], sum(squares) / 4)
    # lambda / 2 sum F d^2, growing with the distance
    shift = {n: torch.full_like(p, 0.01) for n, p in model.named_parameters() if n in first}
    expected = 1.5 * sum(float((first[n] * 0.01 ** 2).sum()) for n in first)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in shift:
                p.add_(shift[n])
    assert float(ewc.penalty(model, 1)) == pytest.approx(expected, rel=1e-4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in shift:
                p.add_(shift[n])  # twice as far: four times the penalty
    assert float(ewc.penalty(model, 1)) == pytest.approx(4 * expected, rel=1e-4)
    # consolidation adds the next task's Fisher and moves theta* to the current weights
    model = ewc.end_task(model, 1, tasks[1], pad_id=0)
    assert float(ewc.penalty(model, 1)) == 0.0
    assert all(bool((ewc.fisher[n] >= first[n]).all()) for n in first)
    assert ewc.fisher_sums[1] > 0 and ewc.end_task(model, 2, tasks[2], pad_id=0) is model
    assert len(ewc.fisher_sums) == 2  # nothing is consolidated after the last task


def test_replay_buffer_holds_ceil_5_percent_of_each_earlier_task_and_never_held_out_examples():
    tasks = _tiny_tasks((40, 61, 20, 10))
    replay = continual.Replay(_baseline_args(), total_rank=2, tasks=tasks)
    batch = tasks[1]["train"][:4]
    assert replay.mix(batch, 0) == batch  # nothing to replay yet
    for stage, task in enumerate(tasks):
        replay.end_task(None, stage, task, pad_id=0)
    assert replay.buffer_sizes == [2, 4, 1]  # ceil(0.05 x 40, 61, 20); nothing kept of the last task
    assert len(replay.buffer) == 7
    for stage, size in enumerate(replay.buffer_sizes):
        kept = [doc for doc in replay.buffer if doc[0][1] == stage + 3]
        assert len(kept) == size
        assert all(doc in tasks[stage]["train"] for doc in kept)
    assert all(doc[0][0] == 1 for doc in replay.buffer)  # train examples only, no held-out one
    mixed = replay.mix(batch, 3)
    assert len(mixed) == 4 and mixed[:3] == batch[:3] and mixed[3] in replay.buffer
    assert continual.Replay(_baseline_args(replay_share=0.5), 2, tasks).replayed_per_batch() == 2
    with pytest.raises(ValueError, match=r"replay fraction must be in \(0, 1\], got 0.0"):
        continual.replay_sample(tasks[0]["train"], 0.0, seed=0)


@pytest.mark.parametrize("method", continual.BASELINES)
def test_every_baseline_runs_through_the_task_sequence(method):
    tasks = _tiny_tasks((12, 12, 12))
    result = continual.run_method(method, _tiny_llama(), tasks, _baseline_args(), pad_id=0, total_rank=6)
    assert len(result["matrix"]) == 4 and len(result["train_losses"]) == 3
    report = result["baseline"]
    if method == "olora":
        assert report["ranks"] == [2, 2, 2]
        # no penalty on the first task; the fresh adapter's random A overlaps the earlier ones afterwards
        assert report["mean_penalty_per_task"][0] == 0.0
        assert all(value > 0 for value in report["mean_penalty_per_task"][1:])
    elif method == "ewc_lora":
        assert len(report["fisher_sum_per_task"]) == 2 and all(f > 0 for f in report["fisher_sum_per_task"])
        assert report["mean_penalty_per_task"][0] == 0.0 and report["mean_penalty_per_task"][2] > 0
    else:
        assert report["buffer_sizes"] == [1, 1] and report["replayed_per_batch"] == 1


def test_an_output_stem_with_a_dot_keeps_its_whole_name():
    from dynamic_lora_common import with_ending

    assert with_ending(Path("results/continual_lr1.5e-4"), ".json") == Path("results/continual_lr1.5e-4.json")
    assert with_ending(Path("results/continual"), ".png") == Path("results/continual.png")


def test_consolidation_goal_checks_every_part_against_plain_lora_and_the_baselines_present():
    def row(forgetting, gain, retention=0.9):
        return {"avg_forgetting": forgetting, "new_task_gain": gain, "retention": retention}

    results = {"plain_lora": row(0.068, 0.315), "lora_merge": row(0.012, 0.271), "ewc_lora": row(0.018, 0.283),
               "dynamic_on": row(0.036, 0.279), "dynamic_consolidate_m1_half": row(0.017, 0.300, 0.98),
               "dynamic_consolidate": row(0.0066, 0.215, 1.14)}
    goal = continual.consolidation_goal(results)
    assert set(goal) == {"evaluated", "dynamic_consolidate_m1_half", "dynamic_consolidate"}  # dynamic_on is not one
    half = goal["dynamic_consolidate_m1_half"]
    assert half["forgetting_ratio_ok"] and half["gain_ok"] and half["retention_ok"]
    assert half["baselines_compared"] == ["ewc_lora", "lora_merge"] and half["baselines_forgetting_less"] == ["lora_merge"]
    assert not half["met"]
    low_gain = goal["dynamic_consolidate"]
    assert low_gain["baselines_forgetting_less"] == [] and not low_gain["gain_ok"] and not low_gain["met"]
    results["dynamic_consolidate_m1_half"] = row(0.011, 0.300, 0.98)
    assert continual.consolidation_goal(results)["dynamic_consolidate_m1_half"]["met"]
    assert continual.consolidation_goal({"lora_merge": row(0.01, 0.3)}) == {"evaluated": False}
