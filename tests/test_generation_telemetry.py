"""Stability monitor, stochastic resonance and ResoGenerateOutput (SPEC §3.8–§3.10)."""

import math
import os

import numpy as np
import pytest
import torch
from reso_test_models import micro_config, micro_model
from transformers.generation import GenerationMixin

import reso_hf
from reso_hf.modeling import generation_reso_llm as gen
from reso_hf.modeling.generation_reso_llm import (
    LYAPUNOV_EPSILON,
    STABILITY_CLASSES,
    ResoGenerateOutput,
    StabilityMonitor,
    StochasticResonanceLogitsProcessor,
    classify_stability,
    entropy_of_scores,
    lyapunov_estimate,
    repetition_score,
)

THETA = 0.1


def hand_lyapunov(entropies):
    """ln(|ΔH| + ε) against i, least squares slope (numpy polyfit), 0 below 5 points."""
    points = np.log(np.abs(np.diff(np.asarray(entropies, dtype=np.float64))) + LYAPUNOV_EPSILON)
    if len(points) < 5:
        return 0.0
    return float(np.polyfit(np.arange(len(points)), points, 1)[0])


def entropies_with_growth(rate: float, n: int = 16, start: float = 2.0, scale: float | None = None):
    """H with |H_i − H_{i−1}| = scale · exp(rate · i), alternating sign: λ ≈ rate (kept inside (0, ln 64))."""
    if scale is None:
        scale = min(0.05, 0.5 * math.exp(-rate * n))
    values = [start]
    for i in range(1, n):
        values.append(values[-1] + (-1) ** i * scale * math.exp(rate * i))
    return values


_BASE_LOGITS = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 3


def scores_with_entropy(target: float) -> torch.Tensor:
    """A (1, 64) score row whose softmax has entropy `target` (bisection on the inverse temperature)."""
    low, high = 1e-4, 1e4
    for _ in range(200):
        mid = math.sqrt(low * high)
        value = float(entropy_of_scores((_BASE_LOGITS * mid)[None]))
        low, high = (mid, high) if value > target else (low, mid)
    return (_BASE_LOGITS * math.sqrt(low * high))[None].double()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [3, 6, 7, 16])
def test_lyapunov_is_the_hand_computed_least_squares_slope(seed, n):
    entropies = torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 3
    expected = hand_lyapunov(entropies.tolist())
    assert float(lyapunov_estimate(entropies)) == pytest.approx(expected, abs=1e-4)
    if n - 1 < 5:
        assert float(lyapunov_estimate(entropies)) == 0.0


def test_class_boundaries_follow_the_spec():
    assert classify_stability(-THETA - 1e-9, THETA) == "collapsed"
    assert classify_stability(-THETA, THETA) == "stable"
    assert classify_stability(-1e-9, THETA) == "stable"
    assert classify_stability(0.0, THETA) == "critical"
    assert classify_stability(THETA, THETA) == "critical"
    assert classify_stability(THETA + 1e-9, THETA) == "divergent"


@pytest.mark.parametrize("rate, expected", [(-0.5, "collapsed"), (-0.05, "stable"), (0.05, "critical"),
                                            (0.5, "divergent")])
def test_every_class_is_reachable_through_the_monitor(rate, expected):
    target = entropies_with_growth(rate)
    monitor = StabilityMonitor(lyapunov_threshold=THETA, window_size=16)
    ids = torch.zeros(1, 1, dtype=torch.long)
    for value in target:
        monitor(ids, scores_with_entropy(value))
    recorded = [float(h[0]) for h in monitor.entropy_trace]
    assert recorded == pytest.approx(target, abs=1e-6)
    telemetry = monitor.row_telemetry(0, len(target))
    assert telemetry["lyapunov"] == pytest.approx(hand_lyapunov(recorded), abs=1e-3)
    assert telemetry["lyapunov"] == pytest.approx(rate, abs=0.02)
    assert telemetry["stability"] == expected
    assert set(STABILITY_CLASSES) == {"collapsed", "stable", "critical", "divergent"}
    # the first steps lack 5 points: λ = 0 there
    assert telemetry["lyapunov_trace"][:5] == [0.0] * 5


def test_divergence_is_predicted_before_it_happens_and_stops_the_row():
    # ln|ΔH_i| = -6 - 0.3·i + 0.02·i²: λ (the local slope, -0.3 + 0.04·i) rises steadily through θ.
    target = [2.0]
    for i in range(1, 23):
        target.append(target[-1] + (-1) ** i * math.exp(-6 - 0.3 * i + 0.02 * i * i))
    monitor = StabilityMonitor(lyapunov_threshold=THETA, window_size=8, predictive_horizon=3,
                               stop_on_divergence=True)
    ids = torch.zeros(1, 1, dtype=torch.long)
    stopped_at = None
    for step, value in enumerate(target):
        monitor(ids, scores_with_entropy(value))
        if stopped_at is None and bool(monitor.stopping_criterion(ids, None)[0]):
            stopped_at = step
    warnings = monitor.row_telemetry(0, len(target))["warnings"]
    kinds = [(w["step"], w["type"]) for w in warnings]
    first_divergent = min(step for step, kind in kinds if kind == "entered_divergent")
    predicted = [step for step, kind in kinds if kind == "predicted_divergent"]
    assert predicted and min(predicted) < first_divergent
    assert stopped_at == first_divergent + 2  # divergent for predictive_horizon = 3 consecutive steps
    assert ("stopped_divergent" in {kind for _, kind in kinds})


def test_auto_temperature_moves_by_class_and_stays_clamped():
    monitor = StabilityMonitor(lyapunov_threshold=THETA, window_size=16, min_temperature=0.5, max_temperature=1.2,
                               base_temperature=0.8, apply_temperature=True)
    ids = torch.zeros(1, 1, dtype=torch.long)
    for value in entropies_with_growth(0.6, n=30, scale=1e-4):
        scores = scores_with_entropy(value)
        out = monitor(ids, scores)
        temperature = float(monitor.temperature_trace[-1][0])
        assert out == pytest.approx(scores * 0.8 / temperature)
    trace = [float(t[0]) for t in monitor.temperature_trace]
    assert all(0.5 <= t <= 1.2 for t in trace)
    assert trace[-1] == pytest.approx(0.5)  # divergent for long: cooled down to min_temperature
    hot = StabilityMonitor(lyapunov_threshold=THETA, window_size=16, min_temperature=0.5, max_temperature=1.2,
                           base_temperature=0.8)
    for value in entropies_with_growth(-0.6, n=16):
        hot(ids, scores_with_entropy(value))
    assert float(hot.temperature_trace[-1][0]) == pytest.approx(1.2)  # collapsed: heated up to max


def test_repetition_score_and_noise_only_above_threshold():
    assert float(repetition_score(torch.tensor([[1, 2, 3, 4, 5]]), 32)) == 0.0
    assert float(repetition_score(torch.tensor([[7, 7, 7, 7, 7]]), 32)) == pytest.approx(1 - 1 / 4)
    assert float(repetition_score(torch.tensor([[1, 2, 1, 2, 1]]), 32)) == pytest.approx(1 - 2 / 4)
    looping = torch.tensor([[5, 6] * 10])
    fresh = torch.arange(20)[None]
    scores = torch.randn(1, 50, generator=torch.Generator().manual_seed(1))

    def run(ids, seed):
        return StochasticResonanceLogitsProcessor(0.5, 16, 0.5, seed)(ids, scores.clone())

    assert torch.equal(run(fresh, 0), scores)
    noisy = run(looping, 0)
    assert not torch.equal(noisy, scores)
    assert torch.equal(noisy, run(looping, 0))  # reproducible
    assert not torch.equal(noisy, run(looping, 1))
    both = StochasticResonanceLogitsProcessor(0.5, 16, 0.5, 0)(torch.cat([looping, fresh]), scores.repeat(2, 1))
    assert torch.equal(both[1], scores[0]) and not torch.equal(both[0], scores[0])
    assert (noisy - scores).std() == pytest.approx(0.5 * scores.std(), rel=0.5)


def test_telemetry_off_is_plain_generate_with_nothing_added(monkeypatch):
    model = micro_model()
    prompt = torch.tensor([[5, 9, 11, 3]])

    def forbidden(*args, **kwargs):
        raise AssertionError("telemetry path used with telemetry off")

    monkeypatch.setattr(type(model), "_reso_generate", forbidden)
    ours = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    plain = GenerationMixin.generate(model, prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, plain)
    torch.manual_seed(3)
    sampled = model.generate(prompt, max_new_tokens=10, do_sample=True, top_k=20, pad_token_id=0)
    torch.manual_seed(3)
    sampled_plain = GenerationMixin.generate(model, prompt, max_new_tokens=10, do_sample=True, top_k=20,
                                             pad_token_id=0)
    assert torch.equal(sampled, sampled_plain)


def test_telemetry_on_keeps_the_greedy_tokens_and_fills_every_field():
    model = micro_model()
    prompt = torch.tensor([[5, 9, 11, 3], [0, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    plain = model.generate(prompt, attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=0)
    out = model.generate(prompt, attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True, output_scores=True)
    assert isinstance(out, ResoGenerateOutput)
    assert torch.equal(out.sequences, plain)
    assert len(out.scores) == out.sequences.shape[1] - 4
    for name in gen.TELEMETRY_FIELDS:
        assert len(getattr(out, name)) == 2, name
    for row in range(2):
        n = out.tokens_generated[row]
        assert 1 <= n <= 9
        for name in ("entropy_trace", "lyapunov_trace", "temperature_trace", "coherence_trace"):
            assert len(getattr(out, name)[row]) == n, name
        assert out.stability[row] in STABILITY_CLASSES
        assert out.lyapunov[row] == out.lyapunov_trace[row][-1]
        assert out.temperature_trace[row] == [1.0] * n  # stability off: nothing adjusted
        assert all(0.0 <= c <= 1.0 + 1e-6 for c in out.coherence_trace[row])  # Kuramoto order parameter
        assert out.goals_achieved[row] == [] and out.attention_summary[row] == {}
        assert isinstance(out.warnings[row], list) and out.generation_time_ms[row] > 0
    # the entropy trace is the entropy of the model's own next-token distribution
    assert out.entropy_trace[0] == pytest.approx([float(entropy_of_scores(s[0:1])) for s in out.scores][:9],
                                                 abs=1e-5)


def test_tokens_generated_stops_at_eos():
    model = micro_model()
    prompt = torch.tensor([[5, 9, 11, 3]])
    first = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, 4:].tolist()
    eos = first[2]
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=eos,
                         return_dict_in_generate=True)
    n = first.index(eos) + 1
    assert out.tokens_generated == [n] and len(out.entropy_trace[0]) == n


def test_coherence_trace_without_kuramoto_is_the_gate_and_empty_without_both():
    gated = micro_model(kuramoto=False)
    out = gated.generate(torch.tensor([[4, 5, 6]]), max_new_tokens=4, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True)
    assert len(out.coherence_trace[0]) == 4 and all(0 <= c <= 1 for c in out.coherence_trace[0])
    bare = micro_model(kuramoto=False, coherence_gating=False)
    out = bare.generate(torch.tensor([[4, 5, 6]]), max_new_tokens=4, do_sample=False, pad_token_id=0,
                        return_dict_in_generate=True)
    assert out.coherence_trace == [[]]


def _enabled_model(seed=0, **extensions):
    torch.manual_seed(seed)
    return reso_hf.ResoLLMForCausalLM(micro_config(**extensions)).eval()


def test_stochastic_resonance_in_generate_is_reproducible_and_recorded():
    model = _enabled_model(stochastic_resonance={"enabled": True, "escape_threshold": 0.2, "repetition_window": 8,
                                                 "noise_amplitude": 2.0})
    prompt = torch.tensor([[5, 6] * 6])  # repetitive prompt: noise from the first step
    runs = [model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, seed=11,
                           return_dict_in_generate=True) for _ in range(2)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    other = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, seed=12)
    plain = GenerationMixin.generate(model, prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert not (torch.equal(other, runs[0].sequences) and torch.equal(plain, runs[0].sequences))
    kinds = [w["type"] for w in runs[0].warnings[0]]
    assert "stochastic_resonance" in kinds
    torch.manual_seed(5)
    a = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.manual_seed(5)
    b = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)  # seed drawn from torch's generator: reproducible under manual_seed


def test_stability_enabled_adjusts_sampling_temperature_within_range():
    model = _enabled_model(stability={"enabled": True, "min_temperature": 0.3, "max_temperature": 0.9,
                                      "window_size": 6})
    torch.manual_seed(0)
    out = model.generate(torch.tensor([[4, 5, 6]]), max_new_tokens=20, do_sample=True, temperature=0.7,
                         pad_token_id=0, return_dict_in_generate=True)
    trace = out.temperature_trace[0]
    assert all(0.3 - 1e-6 <= t <= 0.9 + 1e-6 for t in trace)
    assert len(set(round(t, 6) for t in trace)) > 1  # the rule moved it
    assert isinstance(model.generate(torch.tensor([[4, 5, 6]]), max_new_tokens=3, pad_token_id=0), torch.Tensor)


def test_beam_search_with_an_acting_extension_is_a_clear_error():
    model = _enabled_model(stability={"enabled": True})
    with pytest.raises(ValueError, match="num_beams=2 is not supported with stability.enabled or stochastic_resonance"):
        model.generate(torch.tensor([[4, 5, 6]]), max_new_tokens=3, num_beams=2, pad_token_id=0)


def test_state_is_per_model_and_per_call():
    a, b = _enabled_model(0), _enabled_model(1)
    assert a.get_stability() == b.get_stability() == 0.5
    prompt = torch.tensor([[4, 5, 6]])
    first = a.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert a.get_stability() != 0.5 or first.lyapunov[0] == 0.0
    assert b.get_stability() == 0.5 and b._generation_state()["window"] is None  # nothing leaked to b
    second = a.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert second.lyapunov_trace[0][:5] == [0.0] * 5  # fresh window: no carry-over by default
    assert second.lyapunov_trace == first.lyapunov_trace
    carried = a.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                         keep_stability_window=True)
    assert carried.lyapunov_trace[0][0] != 0.0  # the previous window was continued on request
    a.reset_state()
    assert a.get_stability() == 0.5 and a._generation_state()["window"] is None


def test_suggested_temperature_follows_the_rule():
    model = _enabled_model(stability={"enabled": True, "min_temperature": 0.2, "max_temperature": 1.0})
    with pytest.raises(ValueError, match="current_temp=0 is invalid"):
        model.get_suggested_temperature(0)
    assert model.get_suggested_temperature(0.7) == pytest.approx(0.7)  # no window: critical, hold
    model._generation_state()["window"] = torch.tensor([entropies_with_growth(0.8)])
    model._generation_state()["lyapunov"] = lyapunov_estimate(model._generation_state()["window"])
    assert model.get_stability_class() == "divergent"
    assert model.get_suggested_temperature(0.7) == pytest.approx(0.7 * 0.85, rel=0.06)
    assert model.get_suggested_temperature(0.21) == pytest.approx(0.2)
    assert 0 < model.get_stability() < 0.5


def test_checkpoint_carries_the_generation_file(tmp_path):
    model = micro_model()
    model.config.register_for_auto_class()
    type(model).register_for_auto_class("AutoModelForCausalLM")
    model.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "generation_reso_llm.py")


@pytest.mark.parametrize("steps, carried, window", [(3, None, 6), (7, None, 6), (40, None, 8), (12, 9, 6),
                                                     (17, 3, 16), (40, 16, 16), (1, 4, 8)])
def test_telemetry_only_replay_equals_the_live_monitor(steps, carried, window):
    """Telemetry-only generation computes λ and predictions once at the end; they equal the live ones."""
    g = torch.Generator().manual_seed(steps * 100 + window)
    initial = None if carried is None else torch.rand(2, carried, generator=g) * 3
    live = StabilityMonitor(window_size=window, stop_on_divergence=True, auto_temperature=False,
                            initial_window=initial)
    recorded = StabilityMonitor(window_size=window, auto_temperature=False, initial_window=initial)
    ids = torch.zeros(2, 1, dtype=torch.long)
    for _ in range(steps):
        scores = torch.randn(2, 20, generator=g) * torch.rand(2, 1, generator=g) * 4
        live(ids, scores)
        recorded(ids, scores)
    assert not recorded.lyapunov_trace  # nothing computed during decoding
    recorded.finalize()
    for name in ("lyapunov_trace", "predicted_trace", "steps_to_crossing"):
        assert torch.allclose(torch.stack(getattr(live, name)).float(), torch.stack(getattr(recorded, name)).float(),
                              atol=1e-4), name
    assert torch.allclose(live.window, recorded.window)
