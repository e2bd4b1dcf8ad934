"""Crystalline components (issue 17): geometric activations, phi-harmonic initialisation and LR schedule,
auxiliary losses, metrics and the viz command."""

import json
import math

import numpy as np
import pytest
import torch

import reso_hf
from isolation import run_without_reso_hf
from reso_hf.modeling.crystalline import (
    GOLDEN_RATIO,
    PLATONIC_SOLIDS,
    ResoLLMGeometricActivation,
    edge_length,
    group_widths,
    phi_harmonic_std,
    solid_vertices,
)
from reso_test_models import micro_config

PHI = GOLDEN_RATIO
VERTEX_COUNTS = {"tetrahedron": 4, "cube": 8, "octahedron": 6, "dodecahedron": 20, "icosahedron": 12}
# vertices adjacent to each vertex (at the edge distance)
VERTEX_DEGREES = {"tetrahedron": 3, "cube": 3, "octahedron": 4, "dodecahedron": 3, "icosahedron": 5}


# ------------------------------------------------------------------------------------------------------------
# 1. Geometric activations


@pytest.mark.parametrize("solid", PLATONIC_SOLIDS)
def test_vertex_sets_are_the_platonic_solids(solid):
    vertices = solid_vertices(solid)
    count = vertices.shape[0]
    assert count == VERTEX_COUNTS[solid]
    assert torch.allclose(vertices.norm(dim=-1), torch.ones(count, dtype=torch.float64), atol=1e-12)
    # balanced and a spherical 2-design: what makes y(0) = 0 and the Jacobian at 0 isotropic
    assert torch.allclose(vertices.sum(0), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(vertices.T @ vertices, count / 3 * torch.eye(3, dtype=torch.float64), atol=1e-12)
    # vertex-transitive skeleton: every vertex has the same number of neighbours at the edge length
    distances = torch.cdist(vertices, vertices)
    degrees = ((distances - edge_length(vertices)).abs() < 1e-9).sum(-1)
    assert degrees.tolist() == [VERTEX_DEGREES[solid]] * count
    if solid != "tetrahedron":  # the other four are centrally symmetric: -V is V
        negated = {tuple(np.round(v, 9)) for v in (-vertices).tolist()}
        assert negated == {tuple(np.round(v, 9)) for v in vertices.tolist()}


def test_widths_are_phi_scaled_around_the_edge():
    edge = edge_length(solid_vertices("icosahedron"))
    assert edge == pytest.approx(1.0514622242382672)
    assert group_widths("icosahedron", 4).tolist() == pytest.approx([edge / PHI, edge, edge * PHI, edge / PHI])


@pytest.mark.parametrize("solid", PLATONIC_SOLIDS)
def test_geometric_activation_definition_shape_and_gradients(solid):
    torch.manual_seed(0)
    features = 11  # not a multiple of 3: the last group is zero-padded
    activation = ResoLLMGeometricActivation(solid, features)
    x = torch.randn(2, 5, features, dtype=torch.float64, requires_grad=True)
    y = activation.double()(x)
    assert y.shape == x.shape
    # the definition, written out for group 1 (sigma = edge, the middle width)
    vertices = solid_vertices(solid)
    sigma = edge_length(vertices)
    u = x[0, 0, 3:6]
    bumps = torch.exp(-((u[None] - vertices) ** 2).sum(-1) / sigma**2)
    slope = 2 * vertices.shape[0] / (3 * sigma**2) * math.exp(-1 / sigma**2)
    # (the module keeps its vertices in float32: tolerances of float32 rounding)
    assert torch.allclose(y[0, 0, 3:6], (bumps[:, None] * vertices).sum(0) / slope, atol=1e-6)
    # zero at the origin and the identity to first order there
    zero = torch.zeros(features, dtype=torch.float64)
    assert torch.allclose(activation(zero), zero, atol=1e-7)
    jacobian = torch.autograd.functional.jacobian(activation, zero)
    assert torch.allclose(jacobian, torch.eye(features, dtype=torch.float64), atol=1e-6)
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # far from the solid every response vanishes (a bump, not a ramp)
    assert activation(torch.full((1, features), 50.0, dtype=torch.float64)).abs().max() < 1e-12


def test_unknown_hidden_act_lists_the_allowed_values():
    with pytest.raises(ValueError) as error:
        micro_config(hidden_act="dodecagon")
    message = str(error.value)
    assert "hidden_act='dodecagon' is invalid" in message
    for name in ("silu", "gelu", *PLATONIC_SOLIDS):
        assert repr(name) in message


@pytest.mark.parametrize("solid", PLATONIC_SOLIDS)
def test_mlp_uses_the_solid(solid):
    model = reso_hf.ResoLLMForCausalLM(micro_config(hidden_act=solid))
    activation = model.model.layers[0].mlp.act_fn
    assert isinstance(activation, ResoLLMGeometricActivation) and activation.solid == solid
    # parameter-free: the same checkpoint keys as SiLU
    plain = reso_hf.ResoLLMForCausalLM(micro_config())
    assert model.state_dict().keys() == plain.state_dict().keys()
    ids = torch.tensor([[3, 5, 7, 11, 13]])
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_remote_code_round_trip_with_geometric_activation_and_phi_init(tmp_path):
    """Saved with hidden_act='icosahedron' and initializer='phi_harmonic', the folder loads with
    trust_remote_code where reso_hf is not installed and gives identical logits."""
    torch.manual_seed(0)
    model = reso_hf.ResoLLMForCausalLM(micro_config(hidden_act="icosahedron", initializer="phi_harmonic")).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    assert (folder / "crystalline.py").is_file()
    ids = [[3, 5, 7, 11, 13, 17]]
    with torch.no_grad():
        expected = model(torch.tensor(ids)).logits[0].numpy()
    np.save(tmp_path / "expected.npy", expected)
    output = run_without_reso_hf(
        f"""
        import numpy as np, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(torch.tensor({ids})).logits[0].numpy()
        assert np.array_equal(logits, np.load({str(tmp_path / "expected.npy")!r})), "logits differ"
        print(type(model.model.layers[0].mlp.act_fn).__module__)
        """,
        tmp_path,
    )
    assert output.strip().startswith("transformers_modules.") and output.strip().endswith("crystalline")


# ------------------------------------------------------------------------------------------------------------
# 2. Phi-harmonic initialisation


def test_phi_harmonic_std_formula():
    assert phi_harmonic_std(0.02, 0, 4, 64, 64, False) == pytest.approx(0.02)
    assert phi_harmonic_std(0.02, 2, 4, 64, 64, False) == pytest.approx(0.02 * PHI**-0.5)
    assert phi_harmonic_std(0.02, 2, 4, 256, 64, True) == pytest.approx(0.02 * PHI**-0.5 / PHI / 2)


def test_phi_harmonic_initialisation_std_per_layer():
    torch.manual_seed(0)
    config = micro_config(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                          initializer="phi_harmonic", initializer_range=0.05)
    model = reso_hf.ResoLLMForCausalLM(config)
    for index, layer in enumerate(model.model.layers):
        for module, name in ((layer.self_attn, "q_proj"), (layer.self_attn, "o_proj"), (layer.mlp, "gate_proj"),
                             (layer.mlp, "down_proj")):
            weight = getattr(module, name).weight
            expected = phi_harmonic_std(0.05, index, 3, weight.shape[1], 128, name in ("o_proj", "down_proj"))
            assert float(weight.detach().std()) == pytest.approx(expected, rel=0.03), (index, name)
    assert float(model.model.embed_tokens.weight.std()) == pytest.approx(0.05, rel=0.05)
    plain = reso_hf.ResoLLMForCausalLM(micro_config(hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                                                    num_attention_heads=4, initializer_range=0.05))
    assert float(plain.model.layers[2].mlp.down_proj.weight.std()) == pytest.approx(0.05, rel=0.03)


def test_unknown_initializer_lists_the_allowed_values():
    with pytest.raises(ValueError, match=r"initializer='xavier' is invalid: expected one of \('normal', 'phi_harmonic'\)"):
        micro_config(initializer="xavier")


# ------------------------------------------------------------------------------------------------------------
# 2. Phi learning-rate schedule


def _phi_schedule_learning_rates(steps, **arguments):
    from transformers import TrainingArguments

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    training = TrainingArguments(output_dir="unused", report_to="none", **arguments)
    from transformers import get_scheduler

    scheduler = get_scheduler(training.lr_scheduler_type, optimizer, num_warmup_steps=training.warmup_steps,
                              num_training_steps=steps, scheduler_specific_kwargs=training.lr_scheduler_kwargs)
    rates = []
    for _ in range(steps + 1):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_phi_schedule_values_through_training_arguments():
    # 2 warm-up steps, then D = 100 steps in 2 cycles: L0 = 100 / phi^2 = 38.197, L1 = 61.803
    rates = _phi_schedule_learning_rates(102, lr_scheduler_type="phi", warmup_steps=2,
                                         lr_scheduler_kwargs={"num_cycles": 2})
    first = 100 / PHI**2
    assert rates[0] == 0.0 and rates[1] == pytest.approx(0.05) and rates[2] == pytest.approx(0.1)
    assert rates[2 + 19] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 19 / first)))
    assert rates[2 + 38] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 38 / first)))  # end of cycle 0: ~0
    # the restart: back up to 1/phi of the peak, in a cycle phi times longer
    assert rates[2 + 39] == pytest.approx(0.1 / PHI * 0.5 * (1 + math.cos(math.pi * (39 - first) / (first * PHI))))
    assert rates[2 + 39] > 0.06
    assert rates[102] == pytest.approx(0.0, abs=1e-12)


def test_phi_schedule_min_lr_ratio_and_recipe_flag():
    from reso_hf.training import pretrain
    from reso_hf.training.arguments import parse_recipe

    rates = _phi_schedule_learning_rates(12, lr_scheduler_type="phi", lr_scheduler_kwargs={"num_cycles": 1,
                                                                                            "min_lr_ratio": 0.25})
    assert rates[0] == pytest.approx(0.1) and rates[12] == pytest.approx(0.025)
    model_args, _, training = parse_recipe(pretrain.ARGUMENT_TYPES, None, [
        "--lr_scheduler_type", "phi", "--output_dir", "x", "--coherence_loss_weight", "0.1"])
    assert training.lr_scheduler_type == "phi"
    assert model_args.weights() == {"resonance": 0.0, "coherence": 0.1, "holographic": 0.0}
    with pytest.raises(ValueError, match=r"num_cycles=0 is invalid: expected an int >= 1"):
        _phi_schedule_learning_rates(4, lr_scheduler_type="phi", lr_scheduler_kwargs={"num_cycles": 0})


# ------------------------------------------------------------------------------------------------------------
# 3. Auxiliary losses

from reso_hf.training.auxiliary_losses import (  # noqa: E402
    AuxiliaryLossArguments,
    coherence_loss,
    holographic_loss,
    holographic_subset,
    resonance_loss,
)


def _kuramoto_outputs(weight_std: float, layers: int = 3):
    from reso_hf.modeling.resonance import ResoLLMKuramoto

    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 16)
    mask = torch.ones(2, 7)
    mask[1, 5:] = 0  # padding
    phases, orders = [], []
    for _ in range(layers):
        kuramoto = ResoLLMKuramoto(16, 2, coupling_init=0.5)
        torch.nn.init.normal_(kuramoto.phase_proj.weight, std=weight_std)
        cos, sin, order, _ = kuramoto(hidden, mask, None)
        phases.append((cos, sin))
        orders.append(order)
    return phases, orders, mask


def test_resonance_and_coherence_losses_vanish_for_locked_phases():
    phases, orders, mask = _kuramoto_outputs(0.0)  # every phase 0 in every layer
    assert float(resonance_loss(phases, mask)) == pytest.approx(0.0, abs=1e-7)
    assert float(coherence_loss(orders, mask)) == pytest.approx(0.0, abs=1e-7)
    phases, orders, mask = _kuramoto_outputs(1.0)
    assert float(resonance_loss(phases, mask)) > 0.3
    assert float(coherence_loss(orders, mask)) > 0.1
    # the definition on one hand-made case: layers at phase 0 and pi/2 everywhere -> 1 - cos(pi/2) = 1
    ones, zeros = torch.ones(1, 1, 3), torch.zeros(1, 1, 3)
    assert float(resonance_loss([(ones, zeros), (zeros, ones)])) == pytest.approx(1.0)
    assert float(coherence_loss([torch.full((1, 1, 3), 0.25)])) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="needs >= 2 Kuramoto layers"):
        resonance_loss(phases[:1])


def test_holographic_loss_small_for_redundant_states_and_large_for_noise():
    generator = torch.Generator().manual_seed(0)
    subset = holographic_subset(32, 1 / PHI, generator)
    assert len(subset) == 20
    basis = torch.randn(3, 32)
    redundant = torch.randn(4, 16, 3) @ basis  # rank 3: any 20 dims see all of it
    assert float(holographic_loss(redundant, subset)) < 1e-2
    noise = torch.randn(4, 64, 32)
    assert float(holographic_loss(noise, subset)) > 0.2


def _train_micro(tmp_path, name, auxiliary=None, steps=3):
    from datasets import Dataset
    from transformers import TrainingArguments, default_data_collator

    from reso_hf.training.trainer import AtomicCheckpointTrainer

    torch.manual_seed(0)
    model = reso_hf.ResoLLMForCausalLM(micro_config(use_cache=False))
    ids = torch.randint(3, 97, (8, 12), generator=torch.Generator().manual_seed(1))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    arguments = TrainingArguments(output_dir=str(tmp_path / name), max_steps=steps, per_device_train_batch_size=2,
                                  learning_rate=1e-2, report_to="none", save_strategy="no", logging_steps=1,
                                  use_cpu=True, disable_tqdm=True, seed=0)
    trainer = AtomicCheckpointTrainer(model=model, args=arguments, train_dataset=data, eval_dataset=data,
                                      data_collator=default_data_collator, auxiliary_losses=auxiliary)
    trainer.train()
    return trainer


def test_auxiliary_losses_in_the_trainer(tmp_path):
    plain = _train_micro(tmp_path, "plain")
    zero = _train_micro(tmp_path, "zero", AuxiliaryLossArguments())
    for (name, a), (_, b) in zip(plain.model.state_dict().items(), zero.model.state_dict().items()):
        assert torch.equal(a, b), name  # weight 0: bit-identical training
    weighted = _train_micro(tmp_path, "weighted", AuxiliaryLossArguments(
        resonance_loss_weight=0.5, coherence_loss_weight=0.5, holographic_loss_weight=0.5))
    logged = [entry for entry in weighted.state.log_history if "loss" in entry]
    assert len(logged) == 3
    for entry in logged:  # each term logged separately
        for key in ("aux/resonance_loss", "aux/coherence_loss", "aux/holographic_loss"):
            assert 0 < entry[key] <= 2
    assert not torch.equal(weighted.model.lm_head.weight, plain.model.lm_head.weight)
    # evaluation reports the plain language-model loss
    with torch.no_grad():
        batch = torch.tensor(weighted.eval_dataset["input_ids"])  # one eval batch of all 8 rows
        expected = weighted.model.eval()(batch, labels=batch).loss
    assert weighted.evaluate()["eval_loss"] == pytest.approx(float(expected), rel=1e-5)


def test_auxiliary_loss_weights_enter_the_run_fingerprint_only_when_set():
    """A run folder written before the auxiliary losses existed must still match (resume) at weight 0."""
    from reso_hf.training.arguments import DataArguments, PretrainArguments
    from reso_hf.training.run_folder import run_fingerprint

    data = DataArguments(use_bundled_sample=True)
    default = run_fingerprint("pretrain", (PretrainArguments(), data), data)["fields"]
    assert not {"resonance_loss_weight", "coherence_loss_weight", "holographic_subset_fraction"} & set(default)
    weighted = run_fingerprint("pretrain", (PretrainArguments(coherence_loss_weight=0.1), data), data)["fields"]
    assert weighted == {**default, "coherence_loss_weight": 0.1}


def test_auxiliary_loss_arguments_are_checked():
    with pytest.raises(ValueError, match=r"coherence_loss_weight=-1.0 is invalid: expected a number >= 0"):
        AuxiliaryLossArguments(coherence_loss_weight=-1.0)
    with pytest.raises(ValueError, match=r"holographic_subset_fraction=1.0 is invalid"):
        AuxiliaryLossArguments(holographic_subset_fraction=1.0)


# ------------------------------------------------------------------------------------------------------------
# 4. Metrics (local evaluate modules)


def _metric(name):
    import evaluate

    from reso_hf.metrics import metric_path

    return evaluate.load(metric_path(name))


def test_resonance_accuracy_is_the_shared_prime_factors():
    from reso_hf.modeling.primes import first_primes

    metric = _metric("resonance_accuracy")
    prediction, reference = [5, 7, 7, 9], [7, 5, 11, 7]
    result = metric.compute(predictions=[prediction, [1, 2]], references=[reference, [1, 2]])
    assert result == {"resonance_accuracy": (0.75 + 1.0) / 2, "exact_match": 0.5, "count": 2}
    # the definition: Omega(gcd(sig(pred), sig(ref))) / max length
    primes = first_primes(12)
    gcd = math.gcd(math.prod(primes[i] for i in prediction), math.prod(primes[i] for i in reference))
    factors, p = 0, 2
    while gcd > 1:
        while gcd % p == 0:
            gcd //= p
            factors += 1
        p += 1
    assert factors / 4 == 0.75


def test_coherence_score():
    metric = _metric("coherence_score")
    result = metric.compute(coherence=[[1.0, 0.5], [0.8, 0.2, 0.5]])
    assert result["coherence_score"] == pytest.approx(3.0 / 5)
    assert result["coherent_fraction"] == pytest.approx(2 / 5)  # 1.0 and 0.8 are >= 1/phi
    assert result["min_example_coherence"] == pytest.approx(0.5) and result["tokens"] == 5
    with pytest.raises(ValueError, match="must lie in"):
        metric.compute(coherence=[[1.5]])


def test_holographic_fidelity_is_one_minus_the_holographic_loss():
    from reso_hf.training.auxiliary_losses import holographic_reconstruction

    torch.manual_seed(0)
    states = torch.randn(40, 12, dtype=torch.float64)
    subset = holographic_subset(12, 0.5, torch.Generator().manual_seed(0))
    reconstructed = holographic_reconstruction(states, subset)
    result = _metric("holographic_fidelity").compute(predictions=reconstructed.tolist(), references=states.tolist())
    assert result["holographic_fidelity"] == pytest.approx(1 - float(holographic_loss(states[None], subset)), abs=1e-6)
    perfect = _metric("holographic_fidelity").compute(predictions=states.tolist(), references=states.tolist())
    assert perfect["holographic_fidelity"] == pytest.approx(1.0) and perfect["mean_cosine"] == pytest.approx(1.0)


def test_geometric_alignment():
    metric = _metric("geometric_alignment")
    result = metric.compute(vectors=[[0.0, 0.0, 2.0, 1.0, 1.0, 1.0]], solid="octahedron")
    assert result["geometric_alignment"] == pytest.approx((1 + 1 / math.sqrt(3)) / 2)
    assert result["aligned_fraction"] == 0.5 and result["groups"] == 2
    assert result["chance_alignment"] == pytest.approx(0.8308, abs=1e-3)  # uniform directions (seed 0)
    on_vertices = metric.compute(vectors=[(solid_vertices("icosahedron") * 3).flatten().tolist()], solid="icosahedron")
    assert on_vertices["geometric_alignment"] == pytest.approx(1.0) and on_vertices["aligned_fraction"] == 1.0
    with pytest.raises(ValueError, match=r"solid='sphere' is invalid: expected one of \('tetrahedron'"):
        metric.compute(vectors=[[1.0, 0.0, 0.0]], solid="sphere")


# ------------------------------------------------------------------------------------------------------------
# 5. reso-hf viz


def test_viz_command_writes_the_figures_from_the_model(tmp_path):
    from reso_hf.visualization import activation_responses, coherence_field, phase_trajectories
    from reso_hf_cli import main

    curves = activation_responses("cube")
    middle = len(curves["t"]) // 2
    assert abs(float(curves["t"][middle])) < 1e-12 and abs(float(curves["vertex"][middle])) < 1e-7
    slope = (curves["vertex"][middle + 1] - curves["vertex"][middle - 1]) / (curves["t"][middle + 1] - curves["t"][middle - 1])
    assert float(slope) == pytest.approx(1.0, abs=0.01)  # the identity at the origin

    torch.manual_seed(0)
    tokenizer = reso_hf.create_default_tokenizer()
    model = reso_hf.ResoLLMForCausalLM(micro_config(vocab_size=len(tokenizer))).eval()
    for layer in model.model.layers:  # spread the phases so the field is not trivially 1
        torch.nn.init.normal_(layer.self_attn.kuramoto.phase_proj.weight, std=1.0)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    ids = tokenizer("resonance", return_tensors="pt")["input_ids"]
    field = coherence_field(model, ids)
    with torch.no_grad():
        expected = torch.stack([r[0].mean(0) for r in model(ids, output_coherence=True).coherence])
    assert field.shape == (2, ids.shape[1]) and torch.allclose(field, expected)
    trajectories = phase_trajectories(model, ids)
    with torch.no_grad():
        head_zero = torch.stack([r[0, 0] for r in model(ids, output_coherence=True).coherence])
    assert torch.allclose(trajectories.norm(dim=-1), head_zero, atol=1e-6)  # |z_t| = r_t

    assert main(["viz", "--output_dir", str(tmp_path / "figures"), "--model", str(tmp_path / "model"),
                 "--text", "resonance"]) == 0
    for name in ("activation_responses.png", "coherence_field.png", "phase_space_trajectories.png"):
        assert (tmp_path / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "activation_responses.png", "coherence_field.png", "phase_space_trajectories.png"]
