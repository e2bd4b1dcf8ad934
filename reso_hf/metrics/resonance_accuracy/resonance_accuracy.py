"""ResonanceAccuracy: the share of a reference's tokens that a prediction resonates with (shares prime factors with).

    metric = evaluate.load(reso_hf.metrics.metric_path("resonance_accuracy"))
    metric.compute(predictions=[[5, 7, 7, 9]], references=[[7, 5, 11, 7]])
    # {"resonance_accuracy": 0.75, "exact_match": 0.0, "count": 1}

Definition (README.md of this folder): with p(i) the prime of token id i (SPEC §4) and the signature
sig(x) = prod_t p(x_t), one example scores Omega(gcd(sig(pred), sig(ref))) / max(len(pred), len(ref)), where Omega
counts prime factors with multiplicity. Since the primes are distinct per token, Omega(gcd) is the size of the
multiset intersection of the two token sequences, which is how it is computed (no big integers).
"""

from collections import Counter

import datasets
import evaluate

_DESCRIPTION = "Order-free token overlap of prediction and reference: the shared prime factors of their signatures."
_KWARGS = """
Args:
    predictions: token ids of each prediction.
    references: token ids of each reference.
Returns:
    resonance_accuracy: mean over examples of |pred ∩ ref| (multisets) / max(|pred|, |ref|);
    exact_match: share of examples whose token sequences are equal; count: number of examples.
"""


def resonance(prediction, reference) -> float:
    longest = max(len(prediction), len(reference))
    if longest == 0:
        return 1.0
    return sum((Counter(prediction) & Counter(reference)).values()) / longest


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class ResonanceAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("int64")),
                                        "references": datasets.Sequence(datasets.Value("int64"))}),
        )

    def _compute(self, predictions, references):
        if not predictions:
            raise ValueError("no examples given")
        scores = [resonance(p, r) for p, r in zip(predictions, references)]
        return {"resonance_accuracy": sum(scores) / len(scores),
                "exact_match": sum(list(p) == list(r) for p, r in zip(predictions, references)) / len(scores),
                "count": len(scores)}
