"""HolographicFidelity: how well vectors are reconstructed from a part of themselves (1 - the HolographicLoss).

    metric = evaluate.load(reso_hf.metrics.metric_path("holographic_fidelity"))
    from reso_hf.training.auxiliary_losses import holographic_reconstruction, holographic_subset
    hidden = model.model(ids).last_hidden_state[0]                  # (T, d)
    reconstructed = holographic_reconstruction(hidden, holographic_subset(hidden.shape[-1], 0.618))
    metric.compute(predictions=reconstructed.tolist(), references=hidden.tolist())

Definition in README.md of this folder.
"""

import math

import datasets
import evaluate

_DESCRIPTION = "1 - relative squared reconstruction error, and mean cosine, of reconstructed vectors."
_KWARGS = """
Args:
    predictions: the reconstructed vectors (one per token or example).
    references: the original vectors (same lengths).
Returns:
    holographic_fidelity: 1 - sum ||x_hat - x||^2 / sum ||x||^2; mean_cosine: mean cosine(x_hat, x); count.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class HolographicFidelity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64")),
                                        "references": datasets.Sequence(datasets.Value("float64"))}),
        )

    def _compute(self, predictions, references):
        if not predictions:
            raise ValueError("no vectors given")
        error = energy = cosine_sum = 0.0
        for index, (prediction, reference) in enumerate(zip(predictions, references)):
            if len(prediction) != len(reference):
                raise ValueError(f"vector {index}: prediction has {len(prediction)} values, reference {len(reference)}")
            error += sum((p - r) ** 2 for p, r in zip(prediction, reference))
            energy += sum(r * r for r in reference)
            norms = math.sqrt(sum(p * p for p in prediction)) * math.sqrt(sum(r * r for r in reference))
            cosine_sum += sum(p * r for p, r in zip(prediction, reference)) / norms if norms > 0 else 0.0
        if energy == 0:
            raise ValueError("the references are all zero: fidelity is undefined")
        return {"holographic_fidelity": 1 - error / energy, "mean_cosine": cosine_sum / len(predictions),
                "count": len(predictions)}
