# Two commands for a newcomer: `make demo` (the main job) and `make test` (the test suite).
# Both create/refresh ./.venv and install what they need. torch is pinned to the CPU 2.13.0 build so pip never
# resolves a multi-GB CUDA build on a machine without a GPU.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv test demo clean

$(STAMP): setup.py requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip<26" setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	# deepspeed builds from its sdist; without build isolation so its build sees the pinned torch.
	$(PY) -m pip install -q --no-build-isolation "$(TORCH_SPEC)" -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider tests

# The main job: 4 CPU processes train a small GPT with DeepSpeed, first with DeepSpeed's own 1F1B, then with
# interleaf's zb-v (loss, tokens/s, bubble % per iteration), and draw the measured zb-v schedule to zb-v.png.
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/interleaf compare --pp 4 --microbatches 8
	OMP_NUM_THREADS=1 $(PY) examples/deepspeed/train_gpt_pipeline.py --procs 4 --png zb-v.png

clean:
	rm -rf $(VENV) build *.egg-info
