"""Local `evaluate` modules (SPEC §6), loadable offline: `evaluate.load(metric_path("perplexity"))`."""

from importlib import resources

METRICS = ("perplexity", "forgetting", "stability",
           # crystalline components (issue 17): each folder's README.md is its module card with the definition
           "resonance_accuracy", "coherence_score", "holographic_fidelity", "geometric_alignment")


def metric_path(name: str) -> str:
    """Absolute folder of a bundled metric, for `evaluate.load(path)` (no Hub needed)."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; allowed: {METRICS}")
    return str(resources.files("reso_hf").joinpath("metrics", name))
