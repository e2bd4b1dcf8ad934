"""GeometricAlignment: how closely 3-d groups of vectors point at the vertices of a Platonic solid.

    metric = evaluate.load(reso_hf.metrics.metric_path("geometric_alignment"))
    metric.compute(vectors=[[0.0, 0.0, 2.0, 1.0, 1.0, 1.0]], solid="octahedron")
    # groups (0, 0, 2) -> cos 1 to vertex (0, 0, 1); (1, 1, 1) -> cos 1/sqrt(3) to the nearest vertex

Definition in README.md of this folder.
"""

import math

import datasets
import evaluate
import torch

from reso_hf.modeling.crystalline import PLATONIC_SOLIDS, solid_vertices

_DESCRIPTION = "Mean over 3-d groups of the cosine to the nearest vertex of a Platonic solid, and its chance level."
_KWARGS = """
Args:
    vectors: vectors whose consecutive triples are the 3-d groups (the last group zero-padded, as the geometric
        activations group them).
    solid: tetrahedron, cube, octahedron, dodecahedron or icosahedron.
Returns:
    geometric_alignment: mean over non-zero groups of max_i cos(u, v_i); chance_alignment: the same for directions
    uniform on the sphere (Monte Carlo, 100k, seed 0); aligned_fraction: share of groups within 10 degrees of a
    vertex; groups: number of non-zero groups.
"""
ALIGNED_COSINE = math.cos(math.radians(10))


def alignment_cosines(groups: torch.Tensor, solid: str) -> torch.Tensor:
    directions = groups / groups.norm(dim=-1, keepdim=True)
    return (directions @ solid_vertices(solid).T).max(dim=-1).values


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class GeometricAlignment(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"vectors": datasets.Sequence(datasets.Value("float64"))}),
        )

    def _compute(self, vectors, solid: str = "icosahedron"):
        if solid not in PLATONIC_SOLIDS:
            raise ValueError(f"solid={solid!r} is invalid: expected one of {PLATONIC_SOLIDS}")
        groups = []
        for vector in vectors:
            padded = list(vector) + [0.0] * (-len(vector) % 3)
            groups += [padded[i:i + 3] for i in range(0, len(padded), 3)]
        groups = torch.tensor(groups, dtype=torch.float64)
        groups = groups[groups.norm(dim=-1) > 0] if len(groups) else groups
        if len(groups) == 0:
            raise ValueError("no non-zero 3-d groups given")
        cosines = alignment_cosines(groups, solid)
        uniform = torch.randn(100_000, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        return {"geometric_alignment": float(cosines.mean()),
                "chance_alignment": float(alignment_cosines(uniform, solid).mean()),
                "aligned_fraction": float((cosines >= ALIGNED_COSINE).double().mean()),
                "groups": len(groups)}
