"""Horizontal resonance across two real processes (torchrun, gloo, CPU)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent


def _torchrun_command():
    executable = Path(sys.executable).with_name("torchrun")
    if executable.exists():
        return [str(executable)]
    if shutil.which("torchrun"):
        return [shutil.which("torchrun")]
    return None


def test_swarm_tier_is_synchronised_with_resonance_weights(tmp_path):
    command = _torchrun_command()
    if command is None:
        pytest.skip("torchrun is not installed next to this Python or on PATH")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "LOCAL_"))}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parents[1]))
    process = subprocess.run(
        command + ["--standalone", "--nproc_per_node", "2", str(HERE / "distributed_swarm_worker.py"), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=240,
    )
    assert process.returncode == 0, process.stderr[-4000:]
    tensors = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for phase in ("sync", "aligned", "opposed"):
        assert torch.equal(tensors[0][f"{phase}.swarm"], tensors[1][f"{phase}.swarm"]), phase
        assert torch.equal(tensors[0][f"{phase}.domain"], tensors[1][f"{phase}.domain"]), phase  # shared: averaged
        assert not torch.equal(tensors[0][f"{phase}.agent"], tensors[1][f"{phase}.agent"]), phase
        assert not torch.equal(tensors[0][f"{phase}.context"], tensors[1][f"{phase}.context"]), phase
    aligned = [r["phases"]["aligned"] for r in reports]
    for entry in aligned:  # same data, same function (B = 0): identical updates, alignment 1, weight 1 + 0.5
        swarm = entry["horizontal"]["swarm"]
        assert swarm["alignment"] > 0.99
        assert swarm["weight"] == pytest.approx(min(1 + 0.5 * swarm["alignment"], 2.0))
        # the synchronised update is amplified 1.5x relative to a plain average of the two updates
        assert entry["realised_update_norm"] == pytest.approx(1.5 * entry["plain_update_norm"], rel=1e-3)
    opposed = [r["phases"]["opposed"]["horizontal"]["swarm"] for r in reports]
    assert opposed[0]["alignment"] > 0.99 and opposed[0]["weight"] > 1.49  # rank 0 follows the consensus
    assert opposed[1]["alignment"] < -0.99 and opposed[1]["weight"] < 0.71  # rank 1 opposes it: damped
    assert opposed[1]["weight"] == pytest.approx(1 - 0.3 * abs(opposed[1]["alignment"]))
