import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import reso_hf  # noqa: E402,F401  (registers the Auto classes and the PEFT method)
