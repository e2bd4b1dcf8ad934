"""CoherenceScore: the Kuramoto order parameter r_t of a model's tokens (SPEC §3.3), summarised.

    metric = evaluate.load(reso_hf.metrics.metric_path("coherence_score"))
    outputs = model(ids, output_coherence=True)        # per layer (B, H_kv, T)
    r = torch.stack(outputs.coherence).mean(dim=(0, 2))  # (B, T): mean over layers and heads
    metric.compute(coherence=r.tolist())

Definition in README.md of this folder.
"""

import math

import datasets
import evaluate

GOLDEN_RATIO = (1 + math.sqrt(5)) / 2
_DESCRIPTION = "Mean Kuramoto order parameter r_t over tokens, and the share of tokens above 1/phi."
_KWARGS = """
Args:
    coherence: per example, r_t of each token (in [0, 1]; e.g. averaged over layers and heads).
    threshold (optional, default 1/phi): r_t at or above it counts as a coherent token.
Returns:
    coherence_score: mean r_t over all tokens; coherent_fraction: share of tokens with r_t >= threshold;
    min_example_coherence: the lowest per-example mean; tokens: number of tokens.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class CoherenceScore(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"coherence": datasets.Sequence(datasets.Value("float64"))}),
        )

    def _compute(self, coherence, threshold: float = 1 / GOLDEN_RATIO):
        values = [value for example in coherence for value in example]
        if not values:
            raise ValueError("no tokens given")
        outside = [value for value in values if not 0 <= value <= 1 + 1e-6]
        if outside:
            raise ValueError(f"coherence values must lie in [0, 1] (order parameters); got {outside[0]}")
        return {"coherence_score": sum(values) / len(values),
                "coherent_fraction": sum(value >= threshold for value in values) / len(values),
                "min_example_coherence": min(sum(e) / len(e) for e in coherence if e),
                "tokens": len(values)}
