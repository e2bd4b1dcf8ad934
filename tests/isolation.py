"""Run Python code where transformers/peft are importable but reso_hf is NOT.

A throwaway venv gets a ``.pth`` line pointing at this venv's site-packages: paths listed in a
``.pth`` file are added to ``sys.path`` but ``.pth`` files inside them are not executed, so the
editable-install finder of reso_hf never runs. The child asserts that itself before running the code.
"""

import os
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import torch

_PROOF = (
    "import importlib.util, sys\n"
    "assert importlib.util.find_spec('reso_hf') is None, 'reso_hf is importable in the isolated env'\n"
)


def isolated_python(root: Path) -> Path:
    """Create (once per ``root``) a venv without reso_hf and return its python executable."""
    env_dir = root / "isolated-venv"
    python = env_dir / "bin" / "python"
    if not python.exists():
        venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
        child_site = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
        parent_sites = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
        Path(child_site, "parent_site.pth").write_text("\n".join(sorted(parent_sites)) + "\n")
    return python


def run_without_reso_hf(code: str, root: Path, timeout: int = 300) -> str:
    """Run ``code`` in the isolated venv (cwd = ``root``); return stdout, raise with stderr on failure."""
    python = isolated_python(root)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_MODULES_CACHE"] = str(root / "hf_modules")
    # the child computes with as many intra-op threads as this process: a float32 reduction split over another
    # number of threads sums in another order, and the tests compare logits bit for bit
    threads = f"import torch\ntorch.set_num_threads({torch.get_num_threads()})\n"
    proc = subprocess.run(
        [str(python), "-c", _PROOF + threads + textwrap.dedent(code)],
        cwd=root, env=env, capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"isolated run failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout
