"""Figures of the crystalline components (issue 17), each computed by a function that returns its data:

- `activation_responses`: each Platonic-solid activation along a line through the origin, toward a vertex and
  toward the centre of a face/between vertices, beside SiLU (input t * direction in one 3-d group; the plotted
  response is the output's component along that direction).
- `coherence_field`: the Kuramoto order parameter r_t of a text, per layer x position (mean over key/value heads).
- `phase_trajectories`: the mean field z_t = r_t exp(i psi_t) of each layer in the complex plane, t = 1..T (head 0):
  the path of the text's synchrony; r_t is its distance from the centre.
"""

from __future__ import annotations

import os

import torch

from ..modeling.crystalline import PLATONIC_SOLIDS, ResoLLMGeometricActivation, solid_vertices
from ..training.auxiliary_losses import capture_resonance

ACTIVATION_FIGURE = "activation_responses.png"
COHERENCE_FIGURE = "coherence_field.png"
PHASE_FIGURE = "phase_space_trajectories.png"


def activation_responses(solid: str, points: int = 241, extent: float = 3.0) -> dict[str, torch.Tensor]:
    """{"t": inputs, "vertex": response toward a vertex, "between": toward the normalised sum of a vertex and its
    nearest neighbour (an edge midpoint direction)} for the middle width (group 1, sigma = edge length)."""
    activation = ResoLLMGeometricActivation(solid, 6).double()
    vertices = solid_vertices(solid)
    vertex = vertices[0]
    neighbour = vertices[1:][(vertices[1:] - vertex).norm(dim=-1).argmin()]
    between = (vertex + neighbour) / (vertex + neighbour).norm()
    t = torch.linspace(-extent, extent, points, dtype=torch.float64)
    curves = {"t": t}
    for name, direction in (("vertex", vertex), ("between", between)):
        inputs = torch.zeros(points, 6, dtype=torch.float64)
        inputs[:, 3:6] = t[:, None] * direction  # group 1: sigma = edge length
        curves[name] = (activation(inputs)[:, 3:6] @ direction).detach()
    return curves


@torch.no_grad()
def _kuramoto_record(model, input_ids: torch.LongTensor) -> dict:
    if not getattr(model.config, "kuramoto", False):
        raise ValueError("the coherence field and phase trajectories need a model with kuramoto=True")
    was_training = model.training
    model.eval()
    try:
        with capture_resonance(model, phases=True, hidden=False) as captured:
            model(input_ids=input_ids, use_cache=False)
    finally:
        model.train(was_training)
    return captured


def coherence_field(model, input_ids: torch.LongTensor) -> torch.Tensor:
    """r_t (layers, positions) of the first row of `input_ids`, averaged over key/value heads."""
    orders = _kuramoto_record(model, input_ids)["orders"]
    return torch.stack([order[0].float().mean(dim=0) for order in orders]).cpu()


def phase_trajectories(model, input_ids: torch.LongTensor, head: int = 0) -> torch.Tensor:
    """z_t as (layers, positions, 2) [Re, Im] of the first row of `input_ids`, for key/value head `head`."""
    sums = _kuramoto_record(model, input_ids)["sums"]
    return torch.stack([s[0, head, :, :2] / s[0, head, :, 2:].clamp(min=1) for s in sums]).float().cpu()


def _save(figure, path: str) -> str:
    temporary = path + ".tmp.png"
    figure.savefig(temporary, dpi=110)
    os.replace(temporary, path)
    return path


def write_figures(output_dir: str, model=None, tokenizer=None, text: str | None = None) -> list[str]:
    """Write the activation figure, and with a model, tokenizer and text the coherence and phase figures; returns
    the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(output_dir, exist_ok=True)
    written = []
    figure, axes = plt.subplots(1, len(PLATONIC_SOLIDS), figsize=(4 * len(PLATONIC_SOLIDS), 3.6), sharey=True)
    for axis, solid in zip(axes, PLATONIC_SOLIDS):
        curves = activation_responses(solid)
        axis.plot(curves["t"], curves["vertex"], label="toward a vertex")
        axis.plot(curves["t"], curves["between"], label="toward an edge midpoint")
        axis.plot(curves["t"], torch.nn.functional.silu(curves["t"]), color="grey", linestyle=":", label="SiLU")
        axis.set_title(f"{solid} ({solid_vertices(solid).shape[0]} vertices)")
        axis.set_xlabel("input t (along the direction)")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("response along the direction")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    written.append(_save(figure, os.path.join(output_dir, ACTIVATION_FIGURE)))
    plt.close(figure)
    if model is None:
        return written
    if tokenizer is None or not text:
        raise ValueError("the coherence field and phase trajectories need a tokenizer and a non-empty text")
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"].to(model.device)
    tokens = [tokenizer.decode([i]) for i in input_ids[0].tolist()]

    field = coherence_field(model, input_ids)
    figure, axis = plt.subplots(figsize=(max(6, 0.3 * len(tokens)), 1 + 0.5 * field.shape[0]))
    image = axis.imshow(field, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    axis.set_yticks(range(field.shape[0]), [f"layer {i}" for i in range(field.shape[0])])
    if len(tokens) <= 80:
        axis.set_xticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], rotation=90, fontsize=7)
    axis.set_xlabel("position")
    axis.set_title("Kuramoto order parameter r_t (mean over key/value heads)")
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    written.append(_save(figure, os.path.join(output_dir, COHERENCE_FIGURE)))
    plt.close(figure)

    paths = phase_trajectories(model, input_ids)
    figure, axes = plt.subplots(1, paths.shape[0], figsize=(3.6 * paths.shape[0], 3.6), squeeze=False)
    circle = torch.linspace(0, 2 * torch.pi, 200)
    for layer, axis in enumerate(axes[0]):
        axis.plot(circle.cos(), circle.sin(), color="grey", linewidth=0.6)
        axis.plot(paths[layer, :, 0], paths[layer, :, 1], color="black", linewidth=0.6)
        points = axis.scatter(paths[layer, :, 0], paths[layer, :, 1], c=range(paths.shape[1]), cmap="plasma", s=12)
        axis.set_aspect("equal")
        axis.set_xlim(-1.05, 1.05)
        axis.set_ylim(-1.05, 1.05)
        axis.set_title(f"layer {layer}: mean field z_t (head 0)")
    figure.colorbar(points, ax=axes[0, -1], label="position t")
    figure.tight_layout()
    written.append(_save(figure, os.path.join(output_dir, PHASE_FIGURE)))
    plt.close(figure)
    return written
