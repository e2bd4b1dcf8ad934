"""`reso-hf viz`: PNGs of the crystalline components (issue 17)."""

from .plots import activation_responses, coherence_field, phase_trajectories, write_figures

__all__ = ["activation_responses", "coherence_field", "phase_trajectories", "write_figures"]
