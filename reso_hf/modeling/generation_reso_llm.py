"""Generation side of ResoLLM: stochastic resonance (SPEC §3.8), the predictive stability monitor (§3.9)
and the `ResoGenerateOutput` telemetry of `generate(..., return_dict_in_generate=True)` (§3.10).

Self-contained: copied into every checkpoint, so only torch/transformers/stdlib imports here.

Definitions (all per generated sequence, one value per generated token):

- **Entropy** ``H_t``: Shannon entropy (nats) of ``softmax(scores_t)``, where ``scores_t`` are the scores the
  monitor receives. The monitor is the first of the model's own processors and transformers puts
  user/model processors before the sampling warpers (temperature, top-k, top-p), so ``H_t`` is the entropy
  of the model's next-token distribution after the non-sampling processors (repetition penalty, bad words)
  and before temperature and stochastic-resonance noise.
- **Lyapunov estimate** ``lambda_t``: over the last ``window_size`` entropies ``H_{t-W+1..t}``, the points
  ``d_i = ln(|H_i - H_{i-1}| + LYAPUNOV_EPSILON)`` (W - 1 of them) are fitted by least squares against
  ``i``; ``lambda_t`` is the slope. Fewer than ``MIN_LYAPUNOV_POINTS`` = 5 points gives ``lambda_t = 0``.
- **Class** (θ = ``stability.lyapunov_threshold``): ``collapsed`` (λ < −θ), ``stable`` (−θ ≤ λ < 0),
  ``critical`` (0 ≤ λ ≤ θ), ``divergent`` (λ > θ).
- **Prediction**: the λ values of the last ``window_size`` steps that had enough points are fitted by a
  line (slope ``s``, at least 2 values); ``lambda_t + s * predictive_horizon`` is the extrapolated value.
  A crossing into ``divergent`` is predicted when ``lambda_t <= θ`` and the extrapolation is ``> θ``
  (into ``collapsed`` symmetrically); it is recorded as a warning with the number of steps to the
  crossing, ``ceil((θ - lambda_t) / s)``.
- **Auto temperature** (``stability.auto_temperature_adjust``): per row, starting from the base
  temperature (``generation_config.temperature`` when sampling, else 1.0), after each step
  ``T <- clamp(T * f)`` with ``f`` = ``TEMPERATURE_RULE[class]`` (divergent 0.85: cool down;
  critical 1.0: hold; collapsed 1.15: heat up to leave the loop) except ``stable``, which relaxes
  toward the base temperature (``T <- T + 0.25 (T_base - T)``); a predicted crossing into divergent
  multiplies by a further 0.95. Clamp to [``min_temperature``, ``max_temperature``]. The temperature
  is applied only when sampling (greedy decoding is temperature-invariant; there the trace records
  the temperature the rule would use), by multiplying the scores by ``T_base / T`` before
  transformers' temperature warper divides by ``T_base``.
  With ``stability.enabled=False`` (telemetry only) the rule does not run and the trace is the
  constant base temperature.
- **Stopping**: with ``stability.enabled`` a row stops once it has been ``divergent`` for
  ``predictive_horizon`` consecutive steps (recorded as a ``stopped_divergent`` warning).
- **Stochastic resonance**: repetition score over the last ``repetition_window`` tokens of each row
  = 1 − distinct bigrams / total bigrams. Above ``escape_threshold``, Gaussian noise
  ``noise_amplitude * std(scores_row) * N(0, 1)`` is added to that row's scores. The noise comes from
  a ``torch.Generator`` seeded with the generation seed (``generate(..., seed=N)``, or else one draw
  from torch's global generator, so ``torch.manual_seed`` / ``transformers.set_seed`` make it
  reproducible). One noise tensor is drawn per step for the whole batch, so a row's noise does not
  depend on which other rows are repeating.
- **Layers used** (adaptive depth, ``generate(..., exit_entropy_threshold=...)``): the decoder layers the position
  whose logits produced the token ran before it exited (``num_hidden_layers`` at full depth).
- **Coherence trace**: with ``config.kuramoto`` the Kuramoto order parameter r of the position whose
  logits produced the token, averaged over layers and key/value heads; without Kuramoto but with
  ``config.coherence_gating``, the mean coherence-gate value of that position over layers; with neither
  the trace is empty (there is no coherence signal in that network).

State: per model instance (``model._reso_generation_state``), holding the last generation's entropy
window and λ per row. It is never carried into the next ``generate`` call unless that call passes
``keep_stability_window=True``; ``reset_state()`` / ``_reset_generation_state()`` clears it.
"""

import math
import time
from dataclasses import dataclass

import torch
from transformers.generation import (
    GenerateDecoderOnlyOutput,
    GenerationMixin,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

STABILITY_CLASSES = ("collapsed", "stable", "critical", "divergent")
LYAPUNOV_EPSILON = 1e-6
MIN_LYAPUNOV_POINTS = 5
TEMPERATURE_RULE = {"divergent": 0.85, "critical": 1.0, "collapsed": 1.15}
STABLE_RELAXATION = 0.25
PREDICTED_DIVERGENCE_FACTOR = 0.95

# generate() keyword arguments consumed here (never passed on to transformers).
_RESO_GENERATE_KWARGS = ("seed", "keep_stability_window")


# ---------------------------------------------------------------------------------------------
# Pure functions (shared by the monitor, the multi-agent runtime and the tests)
# ---------------------------------------------------------------------------------------------


def entropy_of_scores(scores: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(scores) per row; -inf scores count as probability 0."""
    probs = torch.softmax(scores.float(), dim=-1)
    return torch.special.entr(probs).sum(dim=-1)


def least_squares_slope(values: torch.Tensor) -> torch.Tensor:
    """Slope of the least-squares line through (i, values[..., i]), i = 0..n-1, per row. n >= 2."""
    n = values.shape[-1]
    x = torch.arange(n, dtype=torch.float32, device=values.device)
    x = x - x.mean()
    centered = values.float() - values.float().mean(dim=-1, keepdim=True)
    return (centered * x).sum(dim=-1) / x.square().sum()


def lyapunov_estimate(entropies: torch.Tensor) -> torch.Tensor:
    """λ per row from an entropy window (B, n) (oldest first); 0 where there are fewer than 5 points."""
    if entropies.dim() == 1:
        entropies = entropies.unsqueeze(0)
    if entropies.shape[-1] - 1 < MIN_LYAPUNOV_POINTS:
        return torch.zeros(entropies.shape[0], dtype=torch.float32, device=entropies.device)
    points = torch.log((entropies[:, 1:].float() - entropies[:, :-1].float()).abs() + LYAPUNOV_EPSILON)
    return least_squares_slope(points)


def classify_stability(lyapunov: float, threshold: float) -> str:
    """The SPEC §3.9 class of one λ value."""
    if lyapunov < -threshold:
        return "collapsed"
    if lyapunov < 0:
        return "stable"
    if lyapunov <= threshold:
        return "critical"
    return "divergent"


def _class_codes(lyapunov: torch.Tensor, threshold: float) -> torch.Tensor:
    """Index into STABILITY_CLASSES per element (vectorised classify_stability)."""
    codes = torch.full_like(lyapunov, 2, dtype=torch.long)
    codes = torch.where(lyapunov < 0, torch.ones_like(codes), codes)
    codes = torch.where(lyapunov < -threshold, torch.zeros_like(codes), codes)
    return torch.where(lyapunov > threshold, torch.full_like(codes, 3), codes)


def stability_score(lyapunov: float, threshold: float) -> float:
    """0–1 stability (1 = most stable): sigmoid(−λ/θ); λ = 0 gives 0.5, λ = θ gives 0.27."""
    return 1.0 / (1.0 + math.exp(max(-60.0, min(60.0, lyapunov / threshold))))


def next_temperature(temperature: float, stability_class: str, base_temperature: float,
                     predicted_divergent: bool, min_temperature: float, max_temperature: float) -> float:
    """One step of the auto-temperature rule (module docstring)."""
    if stability_class == "stable":
        new = temperature + STABLE_RELAXATION * (base_temperature - temperature)
    else:
        new = temperature * TEMPERATURE_RULE[stability_class]
    if predicted_divergent:
        new *= PREDICTED_DIVERGENCE_FACTOR
    return min(max_temperature, max(min_temperature, new))


def repetition_score(input_ids: torch.LongTensor, window: int, vocab_size: int | None = None) -> torch.Tensor:
    """1 − distinct bigrams / total bigrams over the last `window` tokens of each row (0 with < 2 tokens)."""
    tail = input_ids[:, -window:]
    if tail.shape[1] < 2:
        return torch.zeros(input_ids.shape[0], device=input_ids.device)
    base = vocab_size if vocab_size is not None else int(tail.max().item()) + 1
    bigrams = tail[:, :-1] * base + tail[:, 1:]
    ordered = bigrams.sort(dim=-1).values
    distinct = (ordered[:, 1:] != ordered[:, :-1]).sum(dim=-1) + 1
    return 1.0 - distinct.float() / bigrams.shape[1]


# ---------------------------------------------------------------------------------------------
# Stochastic resonance (§3.8)
# ---------------------------------------------------------------------------------------------


class StochasticResonanceLogitsProcessor(LogitsProcessor):
    """Adds Gaussian noise to the scores of rows whose recent output repeats (SPEC §3.8).

    Args:
        noise_amplitude: noise std in units of each row's score std.
        repetition_window: number of recent tokens scored for repetition.
        escape_threshold: repetition score above which noise is added.
        seed: seed of the private torch.Generator (reproducible noise).
    """

    def __init__(self, noise_amplitude: float, repetition_window: int, escape_threshold: float, seed: int):
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed={seed!r} is invalid: expected an int")
        self.noise_amplitude = float(noise_amplitude)
        self.repetition_window = int(repetition_window)
        self.escape_threshold = float(escape_threshold)
        self.seed = seed
        self._generator = None
        self.active_trace: list[torch.Tensor] = []  # per step, bool (B,): noise added to that row

    @classmethod
    def from_config(cls, config, seed: int) -> "StochasticResonanceLogitsProcessor":
        sr = config.stochastic_resonance
        return cls(sr.noise_amplitude, sr.repetition_window, sr.escape_threshold, seed)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        active = repetition_score(input_ids, self.repetition_window, scores.shape[-1]) > self.escape_threshold
        self.active_trace.append(active)
        if not bool(active.any()):
            return scores
        if self._generator is None or self._generator.device != scores.device:
            self._generator = torch.Generator(device=scores.device)
            self._generator.manual_seed(self.seed)
        noise = torch.randn(scores.shape, generator=self._generator, device=scores.device, dtype=torch.float32)
        finite = torch.isfinite(scores)
        values = torch.where(finite, scores.float(), torch.zeros_like(scores, dtype=torch.float32))
        count = finite.sum(dim=-1, keepdim=True).clamp(min=2)
        mean = values.sum(dim=-1, keepdim=True) / count
        std = (torch.where(finite, values - mean, torch.zeros_like(values)).square().sum(dim=-1, keepdim=True)
               / (count - 1)).sqrt()
        noisy = scores.float() + self.noise_amplitude * std * noise
        return torch.where(active[:, None] & finite, noisy, scores.float()).to(scores.dtype)


# ---------------------------------------------------------------------------------------------
# Predictive stability monitor (§3.9)
# ---------------------------------------------------------------------------------------------


class StabilityMonitor(LogitsProcessor):
    """Entropy / Lyapunov monitor with prediction and auto temperature (SPEC §3.9).

    A logits processor: it records H_t, λ_t, the prediction and the temperature for every row and
    step; with `apply_temperature` it rescales the scores to the auto temperature. Its
    `stopping_criterion` (a `StoppingCriteria`) stops rows that stay divergent (`stop_on_divergence`).
    With `apply_temperature=False, stop_on_divergence=False` it only records (telemetry).

    Args:
        lyapunov_threshold, predictive_horizon, window_size, min_temperature, max_temperature:
            as in `StabilityConfig`.
        base_temperature: temperature the auto rule starts from and relaxes to.
        auto_temperature: run the auto-temperature rule (its values go to the trace).
        apply_temperature: also rescale the scores (only meaningful when sampling).
        stop_on_divergence: provide a stopping criterion that stops rows divergent for
            `predictive_horizon` consecutive steps.
        initial_window: optional (B, n) entropies carried over from a previous call.
    """

    def __init__(self, lyapunov_threshold: float = 0.1, predictive_horizon: int = 5, window_size: int = 16,
                 min_temperature: float = 0.1, max_temperature: float = 1.5, base_temperature: float = 1.0,
                 auto_temperature: bool = True, apply_temperature: bool = False, stop_on_divergence: bool = False,
                 initial_window: torch.Tensor | None = None):
        if window_size < MIN_LYAPUNOV_POINTS + 1:
            raise ValueError(f"window_size={window_size} is invalid: expected an int >= {MIN_LYAPUNOV_POINTS + 1}")
        # The warper divides by the generation temperature; the rule starts from it clamped to the range.
        self.warper_temperature = float(base_temperature)
        base_temperature = min(max_temperature, max(min_temperature, base_temperature))
        self.threshold = float(lyapunov_threshold)
        self.horizon = int(predictive_horizon)
        self.window_size = int(window_size)
        self.min_temperature = float(min_temperature)
        self.max_temperature = float(max_temperature)
        self.base_temperature = float(base_temperature)
        self.auto_temperature = auto_temperature
        self.apply_temperature = apply_temperature
        self.window = None if initial_window is None else initial_window.detach().float()[:, -window_size:]
        self.lyapunov_window = None  # (B, n) λ values of steps that had enough points
        self.temperature = None  # (B,)
        self.divergent_streak = None  # (B,)
        self.entropy_trace: list[torch.Tensor] = []
        self.lyapunov_trace: list[torch.Tensor] = []
        self.temperature_trace: list[torch.Tensor] = []
        self.predicted_trace: list[torch.Tensor] = []  # per step, (B,) predicted class code (or -1: none)
        self.steps_to_crossing: list[torch.Tensor] = []
        self.stopping_criterion = _StabilityStoppingCriterion(self) if stop_on_divergence else None
        self._weights: dict = {}
        self._lists: dict | None = None

    @classmethod
    def from_config(cls, config, base_temperature: float = 1.0, do_sample: bool = False, active: bool = True,
                    initial_window: torch.Tensor | None = None) -> "StabilityMonitor":
        st = config.stability
        return cls(
            lyapunov_threshold=st.lyapunov_threshold, predictive_horizon=st.predictive_horizon,
            window_size=st.window_size, min_temperature=st.min_temperature, max_temperature=st.max_temperature,
            base_temperature=base_temperature, auto_temperature=active and st.auto_temperature_adjust,
            apply_temperature=active and do_sample and st.auto_temperature_adjust, stop_on_divergence=active,
            initial_window=initial_window,
        )

    def _push(self, window, values, size):
        if window is None:
            return values[:, None]
        if window.shape[0] != values.shape[0]:
            if window.shape[0] == 1:
                window = window.expand(values.shape[0], -1)
            else:
                raise ValueError(
                    f"keep_stability_window=True: the carried window has {window.shape[0]} rows but this call has "
                    f"{values.shape[0]}; use the same batch size (or 1) or call reset_state()"
                )
        return torch.cat([window, values[:, None]], dim=1)[:, -size:]

    @property
    def live(self) -> bool:
        """Whether λ, prediction and temperature must be computed during decoding (they act on it)."""
        return self.auto_temperature or self.stopping_criterion is not None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        entropy = entropy_of_scores(scores)
        self.entropy_trace.append(entropy)
        if not self.live:
            # Telemetry only: nothing acts on λ during decoding, so it is computed once at the end
            # (`finalize`) by the same `_step` on the recorded entropies.
            return scores
        used_temperature = self._step(entropy)
        if self.apply_temperature:
            scale = (self.warper_temperature / used_temperature).to(scores.dtype)
            return scores * scale[:, None]
        return scores

    def _slope_weights(self, n: int, device) -> torch.Tensor:
        """w with slope = Σ w_i y_i for the least-squares line through (i, y_i), i = 0..n-1."""
        key = (n, str(device))
        weights = self._weights.get(key)
        if weights is None:
            x = torch.arange(n, dtype=torch.float32, device=device)
            x = x - x.mean()
            weights = self._weights[key] = x / x.square().sum()
        return weights

    def _step(self, entropy: torch.Tensor) -> torch.Tensor:
        """One monitor step on the entropies (B,) of one decoding step; returns the temperature used."""
        self.window = self._push(self.window, entropy, self.window_size)
        count = self.window.shape[1] - 1
        if count >= MIN_LYAPUNOV_POINTS:
            points = torch.log((self.window[:, 1:] - self.window[:, :-1]).abs() + LYAPUNOV_EPSILON)
            lyapunov = points @ self._slope_weights(count, entropy.device)
            self.lyapunov_window = self._push(self.lyapunov_window, lyapunov, self.window_size)
        else:
            lyapunov = torch.zeros_like(entropy)
        batch = entropy.shape[0]
        if self.lyapunov_window is not None and self.lyapunov_window.shape[1] >= 2:
            slope = self.lyapunov_window @ self._slope_weights(self.lyapunov_window.shape[1], entropy.device)
            extrapolated = lyapunov + slope * self.horizon
            to_divergent = (lyapunov <= self.threshold) & (extrapolated > self.threshold)
            to_collapsed = (lyapunov >= -self.threshold) & (extrapolated < -self.threshold)
            predicted = torch.where(to_divergent, 3, torch.where(to_collapsed, 0, -1))
            distance = torch.where(to_divergent, self.threshold - lyapunov, -self.threshold - lyapunov).abs()
            steps = torch.ceil(distance / slope.abs().clamp(min=1e-12)).clamp(min=1).long()
            steps = torch.where(predicted >= 0, steps, torch.zeros_like(steps))
        else:
            predicted = torch.full((batch,), -1, dtype=torch.long, device=entropy.device)
            steps = torch.zeros(batch, dtype=torch.long, device=entropy.device)

        if self.temperature is None:
            self.temperature = torch.full((batch,), self.base_temperature, device=entropy.device)
            self.divergent_streak = torch.zeros(batch, dtype=torch.long, device=entropy.device)
        used_temperature = self.temperature
        if self.live:
            codes = _class_codes(lyapunov, self.threshold)
            if self.auto_temperature:
                factors = torch.tensor([TEMPERATURE_RULE["collapsed"], 1.0, TEMPERATURE_RULE["critical"],
                                        TEMPERATURE_RULE["divergent"]], device=entropy.device)
                updated = self.temperature * factors[codes]
                relaxed = self.temperature + STABLE_RELAXATION * (self.base_temperature - self.temperature)
                updated = torch.where(codes == 1, relaxed, updated)
                updated = torch.where(predicted == 3, updated * PREDICTED_DIVERGENCE_FACTOR, updated)
                used_temperature = updated.clamp(self.min_temperature, self.max_temperature)
                self.temperature = used_temperature
            self.divergent_streak = torch.where(codes == 3, self.divergent_streak + 1, torch.zeros_like(codes))

        self.lyapunov_trace.append(lyapunov)
        self.temperature_trace.append(used_temperature)
        self.predicted_trace.append(predicted)
        self.steps_to_crossing.append(steps)
        return used_temperature

    def finalize(self) -> None:
        """Compute λ, predictions and temperatures of the recorded steps (telemetry-only mode)."""
        if self.live or len(self.lyapunov_trace) == len(self.entropy_trace) or not self.entropy_trace:
            return
        # Vectorised over steps; gives what `_step` gives step by step (tested).
        recorded = torch.stack(self.entropy_trace, dim=1)  # (B, T)
        batch, steps = recorded.shape
        device = recorded.device
        if self.window is not None and self.window.shape[0] != batch:
            self.window = self._push(self.window, recorded[:, 0], self.window_size)[:, :-1]
        carried = self.window.shape[1] if self.window is not None else 0
        full = recorded if self.window is None else torch.cat([self.window, recorded], dim=1)
        points = torch.log((full[:, 1:] - full[:, :-1]).abs() + LYAPUNOV_EPSILON)  # point j: full[j] -> full[j+1]
        size = self.window_size - 1
        lyapunov = torch.zeros(batch, steps, device=device)
        for t in range(steps):  # partial windows (at most window_size - 1 of them)
            end = carried + t  # index of this step in `full`
            count = min(end, size)
            if count >= size:
                break
            if count >= MIN_LYAPUNOV_POINTS:
                lyapunov[:, t] = points[:, end - count:end] @ self._slope_weights(count, device)
        first_full = max(0, size - carried)
        if first_full < steps:
            windows = points[:, carried + first_full - size:].unfold(1, size, 1)  # (B, steps - first_full, size)
            lyapunov[:, first_full:] = windows @ self._slope_weights(size, device)
        valid = [t for t in range(steps) if min(carried + t, size) >= MIN_LYAPUNOV_POINTS]
        slope = torch.zeros(batch, steps, device=device)
        has_slope = torch.zeros(steps, dtype=torch.bool, device=device)
        if valid:
            first = valid[0]
            values = lyapunov[:, first:]
            for offset in range(values.shape[1]):
                length = min(offset + 1, self.window_size)
                if length == self.window_size:
                    windows = values.unfold(1, self.window_size, 1)  # windows ending at offset >= W - 1
                    slope[:, first + offset:] = windows[:, offset - self.window_size + 1:] @ self._slope_weights(
                        self.window_size, device)
                    has_slope[first + offset:] = True
                    break
                if length >= 2:
                    slope[:, first + offset] = values[:, offset + 1 - length:offset + 1] @ self._slope_weights(
                        length, device)
                    has_slope[first + offset] = True
        extrapolated = lyapunov + slope * self.horizon
        to_divergent = has_slope & (lyapunov <= self.threshold) & (extrapolated > self.threshold)
        to_collapsed = has_slope & (lyapunov >= -self.threshold) & (extrapolated < -self.threshold)
        predicted = torch.where(to_divergent, 3, torch.where(to_collapsed, 0, -1))
        distance = torch.where(to_divergent, self.threshold - lyapunov, -self.threshold - lyapunov).abs()
        ahead = torch.ceil(distance / slope.abs().clamp(min=1e-12)).clamp(min=1).long()
        ahead = torch.where(predicted >= 0, ahead, torch.zeros_like(ahead))
        self.lyapunov_trace = list(lyapunov.T)
        self.predicted_trace = list(predicted.T)
        self.steps_to_crossing = list(ahead.T)
        self.temperature_trace = [torch.full((batch,), self.base_temperature, device=device)] * steps
        self.window = full[:, -self.window_size:]
        if valid:
            self.lyapunov_window = lyapunov[:, valid[0]:][:, -self.window_size:]

    # -- summaries ------------------------------------------------------------------------------

    def stopped_rows(self) -> torch.Tensor | None:
        if self.divergent_streak is None or self.stopping_criterion is None:
            return None
        return self.divergent_streak >= self.horizon

    def row_telemetry(self, row: int, length: int) -> dict:
        """Telemetry of one row over its first `length` steps (traces, class, λ, warnings)."""
        self.finalize()
        length = min(length, len(self.entropy_trace))
        if self._lists is None or len(self._lists["entropy"]) != len(self.entropy_trace):
            stack = lambda trace: torch.stack(trace).T.tolist() if trace else []  # noqa: E731
            self._lists = {"entropy": self.entropy_trace, "rows": {
                name: stack(trace) for name, trace in (
                    ("entropy", self.entropy_trace), ("lyapunov", self.lyapunov_trace),
                    ("temperature", self.temperature_trace), ("predicted", self.predicted_trace),
                    ("steps", self.steps_to_crossing))}}
        rows = self._lists["rows"]
        take = lambda name: rows[name][row][:length] if rows[name] else []  # noqa: E731
        entropy, lyapunov, temperature = take("entropy"), take("lyapunov"), take("temperature")
        predicted_row, steps_row = take("predicted"), take("steps")
        final = lyapunov[-1] if lyapunov else 0.0
        warnings = []
        previous = "critical"
        streak = 0
        for step in range(length):
            current = classify_stability(lyapunov[step], self.threshold)
            if current in ("divergent", "collapsed") and current != previous:
                warnings.append({"step": step, "type": f"entered_{current}", "lyapunov": lyapunov[step],
                                 "message": f"step {step}: entered {current} (lambda={lyapunov[step]:.4f}, "
                                            f"threshold={self.threshold})"})
            predicted = int(predicted_row[step])
            if predicted >= 0:
                name = STABILITY_CLASSES[predicted]
                steps = int(steps_row[step])
                warnings.append({"step": step, "type": f"predicted_{name}", "lyapunov": lyapunov[step],
                                 "steps_ahead": steps,
                                 "message": f"step {step}: {name} predicted within {steps} step(s) "
                                            f"(lambda={lyapunov[step]:.4f})"})
            streak = streak + 1 if current == "divergent" else 0
            if self.stopping_criterion is not None and streak == self.horizon:
                warnings.append({"step": step, "type": "stopped_divergent", "lyapunov": lyapunov[step],
                                 "message": f"step {step}: stopped after {streak} consecutive divergent steps"})
            previous = current
        return {
            "stability": classify_stability(final, self.threshold),
            "lyapunov": final,
            "entropy_trace": entropy,
            "lyapunov_trace": lyapunov,
            "temperature_trace": temperature,
            "warnings": warnings,
        }


class _StabilityStoppingCriterion(StoppingCriteria):
    """Stops rows that have been divergent for `predictive_horizon` consecutive steps."""

    def __init__(self, monitor: StabilityMonitor):
        self.monitor = monitor

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        stopped = self.monitor.stopped_rows()
        if stopped is None:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return stopped.to(input_ids.device)


# ---------------------------------------------------------------------------------------------
# Output (§3.10)
# ---------------------------------------------------------------------------------------------


@dataclass
class ResoGenerateOutput(GenerateDecoderOnlyOutput):
    r"""`GenerateDecoderOnlyOutput` plus ResoLLM telemetry; every telemetry field is a list with one entry
    per returned sequence (row of `sequences`).

    stability (`list[str]`): final class, one of "collapsed", "stable", "critical", "divergent".
    lyapunov (`list[float]`): final Lyapunov estimate λ.
    entropy_trace, lyapunov_trace, temperature_trace, coherence_trace (`list[list[float]]`): one value per
        generated token (up to and including EOS); coherence is empty when the network has no coherence signal.
    goals_achieved (`list[list[str]]`), attention_summary (`list[dict]`): from `model.goal_telemetry`.
    warnings (`list[list[dict]]`): each with "step", "type", "message" (never printed).
    generation_time_ms (`list[float]`): wall time of the whole `generate` call.
    tokens_generated (`list[int]`): new tokens of the sequence up to and including its first EOS.
    fact_verification (`list[dict | None]`): with `temporal_smf.enabled`, the generated tokens (before EOS) scored
        by `model.verify_statement` against the memories recalled for them: {"score", "log_likelihood_with",
        "log_likelihood_without", "evidence", "statement_tokens"}; None for a row when the memory is empty, nothing was
        generated, or no tokenizer is attached (then a warning says so); None for every row with the memory off.
    layers_used (`list[list[int]]`): per generated token, the decoder layers its position ran before exiting
        (`num_hidden_layers` when it did not exit, or with adaptive depth off; see `AdaptiveDepthConfig`).
    """

    stability: list | None = None
    lyapunov: list | None = None
    entropy_trace: list | None = None
    lyapunov_trace: list | None = None
    temperature_trace: list | None = None
    coherence_trace: list | None = None
    goals_achieved: list | None = None
    attention_summary: list | None = None
    warnings: list | None = None
    generation_time_ms: list | None = None
    tokens_generated: list | None = None
    fact_verification: list | None = None
    layers_used: list | None = None


TELEMETRY_FIELDS = ("stability", "lyapunov", "entropy_trace", "lyapunov_trace", "temperature_trace",
                    "coherence_trace", "goals_achieved", "attention_summary", "warnings", "generation_time_ms",
                    "tokens_generated", "fact_verification", "layers_used")


class _DepthRecorder:
    """A forward hook on the backbone that records, per forward pass, the layers the last position ran."""

    def __init__(self, model):
        self.steps: list[torch.Tensor] = []
        self.num_layers = model.config.num_hidden_layers
        self._handle = model.model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        layers = getattr(output, "exit_layers", None)
        if layers is None:
            batch = (output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]).shape[0]
            layers = torch.full((batch, 1), self.num_layers, dtype=torch.long)
        self.steps.append(layers[:, -1].detach().cpu())

    def rows(self, lengths: list[int]) -> list[list[int]]:
        if not self.steps:
            return [[] for _ in lengths]
        table = torch.stack(self.steps).T.tolist()
        return [table[row][:length] for row, length in enumerate(lengths)]

    def remove(self):
        self._handle.remove()


class _CoherenceRecorder:
    """Forward hooks that record, per forward pass, the mean coherence of the last position (see docstring): each
    layer's hook adds its value, and the backbone's hook closes the step with the mean over the layers that ran
    (all of them, except gates of layers an early exit skipped)."""

    def __init__(self, model):
        self.steps: list[torch.Tensor] = []
        self._current = None
        self._count = 0
        self._handles = []
        for layer in model.model.layers:
            kuramoto = layer.self_attn.kuramoto
            gate = layer.coherence_gate
            if kuramoto is not None:
                self._handles.append(kuramoto.register_forward_hook(self._hook(2, True)))
            elif gate is not None:
                self._handles.append(gate.register_forward_hook(self._hook(1, False)))
        self.active = bool(self._handles)  # the network has a coherence signal
        if self.active:
            self._handles.append(model.model.register_forward_hook(self._close_step))

    def _hook(self, output_index, per_head):
        def hook(module, args, output):
            value = output[output_index].detach()
            value = value[:, :, -1].float().mean(dim=1) if per_head else value[:, -1].float()
            self._current = value if self._count == 0 else self._current + value
            self._count += 1
        return hook

    def _close_step(self, module, args, output):
        if self._count:
            self.steps.append(self._current / self._count)
        self._current, self._count = None, 0

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _tokens_generated(new_tokens: torch.LongTensor, eos_ids: list[int]) -> list[int]:
    lengths = []
    for row in new_tokens.tolist():
        length = len(row)
        for position, token in enumerate(row):
            if token in eos_ids:
                length = position + 1
                break
        lengths.append(length)
    return lengths


def _eos_list(eos) -> list[int]:
    if eos is None:
        return []
    if isinstance(eos, torch.Tensor):
        return [int(x) for x in eos.flatten().tolist()]
    if isinstance(eos, int):
        return [eos]
    return [int(x) for x in eos]


# ---------------------------------------------------------------------------------------------
# The mixin
# ---------------------------------------------------------------------------------------------


class ResoLLMGenerationMixin(GenerationMixin):
    """`GenerationMixin` with ResoLLM's stability monitor, stochastic resonance and telemetry.

    `generate` accepts two extra keyword arguments: `seed` (int, seeds the stochastic-resonance noise)
    and `keep_stability_window` (bool, default False: start the entropy window from the previous call's); and
    `exit_entropy_threshold` (float, adaptive depth), which `forward` takes at every step.
    With both extensions off it is exactly `GenerationMixin.generate`, except that `return_dict_in_generate=True`
    with greedy search or sampling returns `ResoGenerateOutput` (transformers' output plus telemetry); beam search
    then returns transformers' own beam output.
    """

    # -- per-instance state -----------------------------------------------------------------------

    def _generation_state(self) -> dict:
        state = self.__dict__.get("_reso_generation_state")
        if state is None:
            state = {"window": None, "lyapunov": None}
            self.__dict__["_reso_generation_state"] = state
        return state

    def _reset_generation_state(self) -> None:
        """Forget the stability window of the last generation."""
        self.__dict__["_reso_generation_state"] = {"window": None, "lyapunov": None}

    def _last_lyapunov(self) -> float:
        lyapunov = self._generation_state()["lyapunov"]
        return 0.0 if lyapunov is None else float(lyapunov.float().mean())

    def get_stability(self) -> float:
        """Stability of this model's last generation on a 0–1 scale (1 = most stable):
        mean over its sequences of sigmoid(−λ/θ) with λ the final Lyapunov estimate; 0.5 before any
        generation (λ = 0)."""
        threshold = self.config.stability.lyapunov_threshold
        lyapunov = self._generation_state()["lyapunov"]
        if lyapunov is None:
            return stability_score(0.0, threshold)
        return sum(stability_score(float(v), threshold) for v in lyapunov.flatten()) / lyapunov.numel()

    def get_stability_class(self) -> str:
        """SPEC §3.9 class of the mean final λ of the last generation ("critical" before any)."""
        return classify_stability(self._last_lyapunov(), self.config.stability.lyapunov_threshold)

    def get_suggested_temperature(self, current_temp: float) -> float:
        """One step of the auto-temperature rule applied to `current_temp`, using the class and the
        divergence prediction of the last generation's window (relaxation target: `current_temp`)."""
        if not isinstance(current_temp, (int, float)) or isinstance(current_temp, bool) or not current_temp > 0:
            raise ValueError(f"current_temp={current_temp!r} is invalid: expected a number > 0")
        st = self.config.stability
        window = self._generation_state()["window"]
        predicted = False
        if window is not None and window.shape[1] >= MIN_LYAPUNOV_POINTS + 2:
            lam_now = lyapunov_estimate(window).mean()
            lam_before = lyapunov_estimate(window[:, :-1]).mean()
            extrapolated = lam_now + (lam_now - lam_before) * st.predictive_horizon
            predicted = bool(lam_now <= st.lyapunov_threshold and extrapolated > st.lyapunov_threshold)
        return next_temperature(float(current_temp), self.get_stability_class(), float(current_temp), predicted,
                                st.min_temperature, st.max_temperature)

    # -- generate ---------------------------------------------------------------------------------

    def generate(self, inputs=None, generation_config=None, logits_processor=None, stopping_criteria=None,
                 **kwargs):
        seed = kwargs.pop("seed", None)
        keep_window = kwargs.pop("keep_stability_window", False)
        stability_on = self.config.stability.enabled
        resonance_on = self.config.stochastic_resonance.enabled
        if "return_dict_in_generate" in kwargs:
            wants_dict = bool(kwargs["return_dict_in_generate"])
        else:
            wants_dict = bool((generation_config or self.generation_config).return_dict_in_generate)
        if not (stability_on or resonance_on or wants_dict):
            # Telemetry off: exactly the plain transformers path.
            return super().generate(inputs, generation_config, logits_processor, stopping_criteria, **kwargs)
        if not (stability_on or resonance_on) and self._beam_search_requested(generation_config, kwargs):
            # Telemetry follows one row per sequence; a beam search asked only for transformers' own output
            # (scores, beam indices), so it gets exactly that.
            return super().generate(inputs, generation_config, logits_processor, stopping_criteria, **kwargs)
        return self._reso_generate(inputs, generation_config, logits_processor, stopping_criteria, kwargs, seed,
                                   bool(keep_window), stability_on, resonance_on, wants_dict)

    def _fact_verification(self, new_tokens: torch.LongTensor, eos_ids: list[int], warnings: list):
        """`verify_statement` of one row's generated tokens (EOS dropped) against the memory, or None (see
        `ResoGenerateOutput.fact_verification`)."""
        if not self.config.temporal_smf.enabled:
            return None
        statement = [t for t in new_tokens.tolist() if t not in eos_ids]
        if not statement or len(self.reso_state.memory) == 0:
            return None
        if self.tokenizer is None:
            warnings.append({"step": len(statement), "type": "fact_verification",
                             "message": "fact verification needs a tokenizer for the evidence: call attach_tokenizer()"})
            return None
        return self.verify_statement(statement)

    def _beam_search_requested(self, generation_config, kwargs) -> bool:
        effective, _ = self._prepare_generation_config(generation_config, **dict(kwargs))
        return (effective.num_beams or 1) > 1

    def _reso_generate(self, inputs, generation_config, logits_processor, stopping_criteria, kwargs, seed,
                       keep_window, stability_on, resonance_on, wants_dict):
        start = time.perf_counter()
        effective, _ = self._prepare_generation_config(generation_config, **dict(kwargs))
        num_beams = effective.num_beams or 1
        if num_beams > 1:
            raise ValueError(
                f"num_beams={num_beams} is not supported with stability.enabled or stochastic_resonance.enabled: "
                "they act on one row per sequence; use num_beams=1 (greedy or sampling), or disable them in the "
                "config for beam search"
            )
        do_sample = bool(effective.do_sample)
        base_temperature = float(effective.temperature) if do_sample and effective.temperature else 1.0

        state = self._generation_state()
        initial_window = state["window"] if keep_window else None
        monitor = StabilityMonitor.from_config(self.config, base_temperature=base_temperature, do_sample=do_sample,
                                               active=stability_on, initial_window=initial_window)
        processors = LogitsProcessorList([monitor])
        resonance = None
        if resonance_on:
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)).item())
            resonance = StochasticResonanceLogitsProcessor.from_config(self.config, seed)
            processors.append(resonance)
        if logits_processor is not None:
            processors.extend(logits_processor)
        criteria = StoppingCriteriaList(stopping_criteria or [])
        if monitor.stopping_criterion is not None:
            criteria.append(monitor.stopping_criterion)

        recorder = _CoherenceRecorder(self) if wants_dict else None
        depth_recorder = _DepthRecorder(self) if wants_dict else None
        try:
            result = super().generate(inputs, generation_config, processors, criteria, **kwargs)
        finally:
            if recorder is not None:
                recorder.remove()
                depth_recorder.remove()
        elapsed_ms = (time.perf_counter() - start) * 1000.0

        monitor.finalize()
        if monitor.window is not None:
            state["window"] = monitor.window.detach()
            state["lyapunov"] = lyapunov_estimate(monitor.window).detach()
        if not wants_dict:
            return result

        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        prompt_length = prompt.shape[1] if prompt is not None else 0
        sequences = result.sequences
        lengths = _tokens_generated(sequences[:, prompt_length:], _eos_list(effective.eos_token_id))
        goals, summaries = self.goal_telemetry(sequences, prompt_length)
        telemetry = {name: [] for name in TELEMETRY_FIELDS}
        coherence_rows = torch.stack(recorder.steps).T.tolist() if recorder.active and recorder.steps else None
        telemetry["layers_used"] = depth_recorder.rows(lengths)
        for row, length in enumerate(lengths):
            summary = monitor.row_telemetry(row, length)
            if resonance is not None:
                steps = [step for step, active in enumerate(resonance.active_trace[:length]) if bool(active[row])]
                if steps:
                    summary["warnings"].append({
                        "step": steps[0], "type": "stochastic_resonance", "steps": steps,
                        "message": f"noise injected at {len(steps)} step(s) (repetition above "
                                   f"{self.config.stochastic_resonance.escape_threshold})"})
            for name in ("stability", "lyapunov", "entropy_trace", "lyapunov_trace", "temperature_trace", "warnings"):
                telemetry[name].append(summary[name])
            telemetry["coherence_trace"].append(coherence_rows[row][:length] if coherence_rows else [])
            telemetry["goals_achieved"].append(goals[row])
            telemetry["attention_summary"].append(summaries[row])
            telemetry["generation_time_ms"].append(elapsed_ms)
            telemetry["tokens_generated"].append(length)
            telemetry["fact_verification"].append(self._fact_verification(
                sequences[row, prompt_length:prompt_length + length], _eos_list(effective.eos_token_id),
                summary["warnings"]))
        base = {key: value for key, value in result.items()}
        return ResoGenerateOutput(**base, **telemetry)


__all__ = [
    "ResoGenerateOutput",
    "ResoLLMGenerationMixin",
    "StabilityMonitor",
    "StochasticResonanceLogitsProcessor",
    "classify_stability",
    "entropy_of_scores",
    "lyapunov_estimate",
    "repetition_score",
]
