"""Statistics of the generation stability monitor (SPEC §3.9) over many generations.

    metric = evaluate.load(reso_hf.metrics.metric_path("stability"))
    metric.compute(stability=["stable", "critical"], lyapunov=[-0.2, 0.05])
    # {"fraction": {"collapsed": 0.0, "stable": 0.5, "critical": 0.5, "divergent": 0.0},
    #  "mean_lyapunov": -0.075, "max_lyapunov": 0.05, "count": 2}
"""

import datasets
import evaluate

CLASSES = ("collapsed", "stable", "critical", "divergent")
_DESCRIPTION = "Fraction of generations per stability class and Lyapunov statistics."
_KWARGS = """
Args:
    stability: the class of each generation, one of collapsed, stable, critical, divergent.
    lyapunov: the final Lyapunov estimate of each generation.
Returns:
    fraction (per class), mean_lyapunov, max_lyapunov, count.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Stability(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"stability": datasets.Value("string"), "lyapunov": datasets.Value("float64")}),
        )

    def _compute(self, stability, lyapunov):
        if not stability:
            raise ValueError("no generations given")
        unknown = sorted(set(stability) - set(CLASSES))
        if unknown:
            raise ValueError(f"unknown stability classes {unknown}; allowed: {list(CLASSES)}")
        count = len(stability)
        return {"fraction": {name: stability.count(name) / count for name in CLASSES},
                "mean_lyapunov": sum(lyapunov) / count, "max_lyapunov": max(lyapunov), "count": count}
