"""Perplexity from summed token negative log-likelihoods (nats), as accumulated during evaluation.

    metric = evaluate.load(reso_hf.metrics.metric_path("perplexity"))
    metric.add_batch(nll_sum=[12.3, 8.1], token_count=[10, 7])     # one entry per batch or sequence
    metric.compute()  # {"loss": 20.4 / 17, "perplexity": exp(20.4 / 17), "tokens": 17}

Token-weighted: the loss is the mean over all tokens, not the mean of per-batch means.
"""

import math

import datasets
import evaluate

_DESCRIPTION = "Token-weighted mean negative log-likelihood (nats/token) and its exponential, the perplexity."
_KWARGS = """
Args:
    nll_sum: summed negative log-likelihood (natural log) of the target tokens of one batch or sequence.
    token_count: number of target tokens in that batch or sequence (> 0 in total).
Returns:
    loss: mean NLL per token; perplexity: exp(loss); tokens: number of target tokens.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"nll_sum": datasets.Value("float64"), "token_count": datasets.Value("int64")}),
        )

    def _compute(self, nll_sum, token_count):
        if any(count < 0 for count in token_count):
            raise ValueError("token_count must be >= 0")
        tokens = int(sum(token_count))
        if tokens == 0:
            raise ValueError("no target tokens: token_count sums to 0")
        loss = float(sum(nll_sum)) / tokens
        return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}
