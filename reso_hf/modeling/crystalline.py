"""Crystalline components of the network (issue 17): Platonic-solid activations and the phi-harmonic initialisation.

Self-contained (copied into checkpoints): only torch and the standard library.

Geometric activation of a solid with unit vertices v_1..v_N (README "Crystalline components"). The input vector is
cut into groups of 3 (the last group zero-padded); group j, u in R^3, responds to every vertex with a Gaussian bump
and the bumps are summed back along the vertices (the seed's T(r) = sum_i v_i exp(-r^2 / sigma^2)):

    a_i(u) = exp(-||u - v_i||^2 / sigma_j^2)
    y(u)   = (1 / c_j) * sum_i a_i(u) v_i,         c_j = (2 N / (3 sigma_j^2)) exp(-1 / sigma_j^2)

The widths are phi-scaled around the solid's edge length e (nearest-vertex distance):
sigma_j = e * phi^((j mod 3) - 1), so successive groups see the solid at widths e/phi, e, e*phi. Every vertex set
here is balanced (sum_i v_i = 0) and a spherical 2-design (sum_i v_i v_i^T = N/3 I), so y(0) = 0 and the Jacobian at
0 is exactly c_j I: dividing by c_j makes every group the identity to first order at the origin; away from it the
response bends toward the nearest vertices and falls to 0 far from the solid. No parameters (the map back to R^3
is the fixed vertex matrix), so switching an activation changes no checkpoint key.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

GOLDEN_RATIO = (1 + math.sqrt(5)) / 2
PLATONIC_SOLIDS = ("tetrahedron", "cube", "octahedron", "dodecahedron", "icosahedron")
INITIALIZERS = ("normal", "phi_harmonic")
# Projections that write into the residual stream: phi_harmonic gives them one more factor 1/phi.
RESIDUAL_WRITERS = ("o_proj", "down_proj")
# The decoder layer's projections that phi_harmonic draws, by submodule.
PHI_HARMONIC_PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
                            "mlp": ("gate_proj", "up_proj", "down_proj")}


def _cyclic_permutations(point):
    x, y, z = point
    return [(x, y, z), (y, z, x), (z, x, y)]


def _signs(point):
    """Every sign combination of the non-zero coordinates (zeros stay)."""
    choices = [(c, -c) if c != 0 else (0.0,) for c in point]
    return list(itertools.product(*choices))


def solid_vertices(solid: str) -> torch.Tensor:
    """Unit-norm vertices (N, 3) float64 of a Platonic solid centred at the origin (4, 8, 6, 20, 12 of them)."""
    phi = GOLDEN_RATIO
    if solid == "tetrahedron":
        points = [(1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1)]
    elif solid == "cube":
        points = _signs((1, 1, 1))
    elif solid == "octahedron":
        points = [p for axis in range(3) for p in _signs(tuple(1.0 if i == axis else 0.0 for i in range(3)))]
    elif solid == "dodecahedron":
        points = _signs((1, 1, 1)) + [q for p in _signs((0, 1 / phi, phi)) for q in _cyclic_permutations(p)]
    elif solid == "icosahedron":
        points = [q for p in _signs((0, 1, phi)) for q in _cyclic_permutations(p)]
    else:
        raise ValueError(f"solid={solid!r} is invalid: expected one of {PLATONIC_SOLIDS}")
    # Explicitly on the CPU: models are built under a meta-device context when loaded, and this is fixed geometry.
    vertices = torch.tensor(sorted(set(tuple(float(c) for c in p) for p in points)), dtype=torch.float64, device="cpu")
    return vertices / vertices.norm(dim=-1, keepdim=True)


def edge_length(vertices: torch.Tensor) -> float:
    """Nearest-neighbour distance between distinct vertices (the edge of the solid)."""
    distances = torch.cdist(vertices, vertices)
    distances.fill_diagonal_(float("inf"))
    return float(distances.min())


def group_widths(solid: str, num_groups: int) -> torch.Tensor:
    """sigma_j = e * phi^((j mod 3) - 1) for the groups j = 0..num_groups-1, float64."""
    edge = edge_length(solid_vertices(solid))
    exponents = torch.arange(num_groups, dtype=torch.float64, device="cpu").remainder(3) - 1
    return edge * GOLDEN_RATIO**exponents


def origin_slopes(num_vertices: int, widths: torch.Tensor) -> torch.Tensor:
    """c_j: the Jacobian of the unnormalised response at u = 0 is c_j I (unit vertices, a spherical 2-design)."""
    return 2 * num_vertices / (3 * widths.square()) * torch.exp(-1 / widths.square())


class ResoLLMGeometricActivation(nn.Module):
    """The activation `hidden_act=<solid>` (see the module docstring for the definition); shape preserving."""

    def __init__(self, solid: str, features: int):
        super().__init__()
        if solid not in PLATONIC_SOLIDS:
            raise ValueError(f"solid={solid!r} is invalid: expected one of {PLATONIC_SOLIDS}")
        self.solid = solid
        self.features = features
        self.num_groups = -(-features // 3)
        # Fixed geometry, recomputed by `_init_weights` (non-persistent: not part of the checkpoint).
        vertices, inverse_variances, output_scales = self.geometry(solid, self.num_groups)
        self.vertices = nn.Buffer(vertices, persistent=False)
        self.inverse_variances = nn.Buffer(inverse_variances, persistent=False)
        self.output_scales = nn.Buffer(output_scales, persistent=False)

    @staticmethod
    def geometry(solid: str, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(vertices (N, 3), 1 / sigma_j^2 (G, 1), 1 / c_j (G, 1)) in float32."""
        vertices = solid_vertices(solid)
        widths = group_widths(solid, num_groups)
        slopes = origin_slopes(vertices.shape[0], widths)
        return vertices.float(), (1 / widths.square()).float()[:, None], (1 / slopes).float()[:, None]

    def extra_repr(self) -> str:
        return f"solid={self.solid}, features={self.features}, vertices={self.vertices.shape[0]}"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        padding = 3 * self.num_groups - self.features
        groups = nn.functional.pad(hidden_states, (0, padding)) if padding else hidden_states
        groups = groups.unflatten(-1, (self.num_groups, 3))  # (..., G, 3)
        vertices = self.vertices.to(groups.dtype)
        # ||u - v||^2 = ||u||^2 - 2 u.v + 1 for unit vertices
        squared_distances = groups.square().sum(-1, keepdim=True) - 2 * groups @ vertices.T + 1
        responses = torch.exp(-squared_distances * self.inverse_variances.to(groups.dtype))  # (..., G, N)
        output = (responses @ vertices) * self.output_scales.to(groups.dtype)
        output = output.flatten(-2)
        return output[..., : self.features] if padding else output


def phi_harmonic_std(initializer_range: float, layer_idx: int, num_layers: int, fan_in: int, hidden_size: int,
                     writes_residual: bool) -> float:
    """Std of a decoder projection under `initializer="phi_harmonic"`:

        std = initializer_range * phi^(-l / L) * phi^(-[writes residual]) * sqrt(hidden_size / fan_in)

    depth l = 0..L-1 (the last layer starts 1/phi^((L-1)/L) as large as the first), one more 1/phi for the
    projections that write into the residual stream (o_proj, down_proj), and fan-in scaling relative to the
    hidden size (= phi^(-1/2 log_phi(fan_in / hidden_size)))."""
    depth = GOLDEN_RATIO ** (-layer_idx / num_layers)
    role = 1 / GOLDEN_RATIO if writes_residual else 1.0
    return initializer_range * depth * role * math.sqrt(hidden_size / fan_in)
