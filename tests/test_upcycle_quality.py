"""benchmarks/upcycle_quality.py end to end on a tiny random Llama and the bundled guanaco sample: every converted
variant starts from exactly the source's held-out loss (conversion is an identity), the LoRA baselines get the
ranks whose parameter counts match, and the goal ratios are the documented ones."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import upcycle_quality  # noqa: E402
from distributed_check import make_sft_base  # noqa: E402

from reso_hf.training.data import bundled_sample_path  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("upcycle")
    base = make_sft_base(folder / "tiny-llama")
    torch.manual_seed(0)
    return upcycle_quality.main(["--model", str(base), "--data", bundled_sample_path(), "--split", "dev", "--steps",
                                 "2", "--batch", "2", "--seq", "48", "--eval-examples", "4", "--seeds", "0",
                                 "--threads", "1", "--out", str(folder / "result")])


def test_every_variant_runs_and_converted_variants_start_at_the_source_loss(report):
    rows = {row["variant"]: row for row in report["rows"]}
    assert sorted(rows) == sorted(upcycle_quality.VARIANTS)
    plain = rows["full_smollm2"]["loss_before"]
    for variant in (*upcycle_quality.RESONANT, "resonant_dynamic", "full_resollm", "lora_match_resonant"):
        assert rows[variant]["loss_before"] == pytest.approx(plain, abs=1e-5), variant
    # training moved only what it should: the prime code under resonant_prime, nothing Kuramoto-side
    assert rows["resonant_prime"]["resonant_norms"]["prime_code"] > 0
    assert set(rows["resonant_prime"]["resonant_norms"]) == {"prime_code"}
    assert rows["resonant_prime"]["trainable_params"] < rows["resonant_all"]["trainable_params"]


def test_matched_lora_ranks_and_goal_ratios(report):
    rows = {row["variant"]: row for row in report["rows"]}
    for lora, resonant in (("lora_match_resonant", "resonant_all"), ("lora_match_dynamic", "resonant_dynamic")):
        per_rank = rows[lora]["trainable_params"] // report["lora_ranks"][lora]
        # the nearest rank: the counts differ by at most half a rank's parameters (or the rank is the minimum, 1)
        assert (abs(rows[lora]["trainable_params"] - rows[resonant]["trainable_params"]) <= per_rank / 2
                or report["lora_ranks"][lora] == 1)
    for variant, goal in report["goal"].items():
        ratio = rows[variant]["loss_after"] / rows[goal["against"]]["loss_after"]
        assert goal["ratio"] == pytest.approx(ratio) and goal["met"] == (ratio <= 0.99)
    assert Path(report["settings"]["model"]).exists()


def test_knocking_out_the_only_trained_component_gives_back_the_source_loss(report):
    rows = {row["variant"]: row for row in report["rows"]}
    for variant, kind in (("resonant_prime", "prime_code"), ("resonant_kuramoto", "kuramoto"),
                          ("resonant_gating", "coherence_gate")):
        row = rows[variant]
        assert set(row["knockout_losses"]) == {kind}
        assert row["knockout_losses"][kind] == pytest.approx(row["loss_before"], abs=1e-5), variant
    assert set(rows["resonant_all"]["knockout_losses"]) == set(upcycle_quality.RESONANT_COMPONENTS)
    # training did move them off the identity (where the statistics read 0 / 1, next test)
    assert max(rows["resonant_kuramoto"]["component_statistics"]["kuramoto"]["phase_rms"]) > 0
    assert min(rows["resonant_gating"]["component_statistics"]["coherence_gate"]["gate_mean"]) != 1.0
    assert rows["resonant_prime"]["component_statistics"]["prime_code"]["relative_rms"] > 0
    assert set(rows["resonant_dynamic"]["component_statistics"]) == set(upcycle_quality.RESONANT_COMPONENTS)
    for plain in ("lora_match_resonant", "full_smollm2"):
        assert "component_statistics" not in rows[plain] and "knockout_losses" not in rows[plain]


def test_component_statistics_read_the_identity_at_conversion(tmp_path):
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from reso_hf.conversion import convert_from_llama
    from reso_hf.loading import load_causal_lm

    folder = make_sft_base(tmp_path / "tiny-llama")
    converted = convert_from_llama(load_causal_lm(str(folder)), **upcycle_quality.ALL_SWITCHES)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    _, docs = upcycle_quality.build_data(SimpleNamespace(data=bundled_sample_path(), split="dev", seq=96,
                                                         eval_examples=3), tokenizer)
    assert len(docs) == 3
    stats = upcycle_quality.component_statistics(converted, docs, tokenizer.pad_token_id or 0, batch=2)
    layers = converted.config.num_hidden_layers
    assert stats["coherence_gate"]["gate_mean"] == pytest.approx([1.0] * layers, abs=1e-6)
    assert stats["coherence_gate"]["share_below_0.9"] == [0.0] * layers
    assert stats["kuramoto"]["order_r"] == pytest.approx([1.0] * layers, abs=1e-6)
    assert stats["kuramoto"]["phase_rms"] == pytest.approx([0.0] * layers, abs=1e-6)
    assert stats["prime_code"]["relative_rms"] == 0.0


def test_start_at_identity_names_the_allowed_components():
    from reso_hf.conversion import start_at_identity

    with pytest.raises(ValueError, match=r"components=\['gates'\] are invalid.*prime_code"):
        start_at_identity(None, ["gates"])


def test_kuramoto_learning_rate_gets_its_own_group(tmp_path):
    from types import SimpleNamespace

    from reso_hf.loading import load_causal_lm

    base = load_causal_lm(str(make_sft_base(tmp_path / "tiny-llama")))
    model, _ = upcycle_quality.build_variant("resonant_all", base, {})
    kuramoto = {id(p) for name, p in model.named_parameters() if ".kuramoto." in name}
    default = SimpleNamespace(kuramoto_lr=None, resonant_dynamic_lr=None)
    assert [g["lr"] for g in upcycle_quality.parameter_groups(model, "resonant_all", 1e-4, default)] == [1e-4]
    groups = upcycle_quality.parameter_groups(model, "resonant_all", 1e-4,
                                              SimpleNamespace(kuramoto_lr=3e-3, resonant_dynamic_lr=None))
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in groups}
    assert by_lr[3e-3] == kuramoto and by_lr[1e-4] and not by_lr[1e-4] & kuramoto
    full, _ = upcycle_quality.build_variant("full_resollm", base, {})  # full fine-tuning: one rate for everything
    assert len(upcycle_quality.parameter_groups(full, "full_resollm", 2e-5,
                                                SimpleNamespace(kuramoto_lr=3e-3, resonant_dynamic_lr=None))) == 1


def test_component_table_reports_the_knockout_differences(report):
    rows = {row["variant"]: row for row in report["rows"]}
    table = upcycle_quality.component_table(report["rows"])
    line = next(line for line in table.splitlines() if line.startswith("| resonant_all |"))
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    knocked = rows["resonant_all"]["knockout_losses"]
    expected = [f"{knocked[kind] - rows['resonant_all']['loss_after']:+.4f}" for kind in upcycle_quality.RESONANT_COMPONENTS]
    assert cells[3:6] == expected
    assert not any(line.startswith("| lora_match") or line.startswith("| full_smollm2") for line in table.splitlines())
