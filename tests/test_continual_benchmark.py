"""The pure parts of benchmarks/continual.py (the language rule, the metrics, the splits, combining runs, the plots)
and the per-module cosines of benchmarks/continual_resonance.py."""

import argparse
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
