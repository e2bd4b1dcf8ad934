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
