"""benchmarks/wavegen.py and benchmarks/fim.py in their --quick modes: the reports hold what the README quotes, and
the properties that must hold whatever the model: every cache hit equals a fresh generation, a context-tier change
spares the entries served with the context tier off, a slow-tier change invalidates every entry, and both FIM runs
had the same budget."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fim  # noqa: E402
import wavegen  # noqa: E402


@pytest.fixture(scope="module")
def wavegen_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("wavegen") / "wavegen_quick"
    return wavegen.main(["--quick", "--out", str(out)]), out


def test_wavegen_benchmark_checks_every_hit_and_the_invalidation_rule(wavegen_report):
    report, out = wavegen_report
    assert json.loads(out.with_suffix(".json").read_text())["requests"] == 40
    assert out.with_suffix(".png").stat().st_size > 0
    runs = report["runs"]
    assert report["all_hits_correct"] and report["hits_verified"] == sum(r["stats"]["hits"] for r in runs.values())
    static = runs["static"]["stats"]
    # without changes a request misses only the first time, or again after its entry migrated (and was evicted)
    assert static["hits"] + static["misses"] == report["requests"]
    assert 0 <= static["misses"] - report["distinct_requests"] <= static["migrated"]
    assert static["evictions"] == 0 and static["migrated"] > 0
    assert runs["static"]["stats"]["invalidated_entries"] == 0
    assert runs["dynamic_context_off"]["stats"]["invalidated_entries"] == 0
    assert runs["dynamic"]["stats"]["invalidated_entries"] > 0
    for name, run in runs.items():
        assert run["slow_change_invalidated"] == run["entries_before_changes"] > 0
        expected = 0 if name == "dynamic_context_off" else run["entries_before_changes"]
        assert run["context_change_invalidated"] == expected


def test_fim_benchmark_runs_at_equal_budget(tmp_path):
    report = fim.main(["--quick", "--out", str(tmp_path / "fim_quick")])
    runs = report["runs"]
    assert sorted(runs) == ["fim_0.5", "no_fim"]
    assert runs["fim_0.5"]["global_step"] == runs["no_fim"]["global_step"] == report["steps"]
    assert runs["fim_0.5"]["parameters"] == runs["no_fim"]["parameters"]
    for run in runs.values():
        assert run["eval"]["middle_tokens"] > 0
        keys = ("infill_psm", "prefix_only", "infill_psm_short", "prefix_only_short", "next_token")
        assert all(0 < run["eval"][key] < 10 for key in keys)
    assert report["next_token_cost_ratio"] == pytest.approx(
        runs["fim_0.5"]["eval"]["next_token"] / runs["no_fim"]["eval"]["next_token"])
    assert (tmp_path / "fim_quick.png").stat().st_size > 0
