# VoiceMan pipeline. Every target creates/updates the virtualenv it needs.
# DAGSTER_HOME is this folder: dagster.yaml here keeps storage under data/dagster/.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DAGSTER_HOME := $(CURDIR)
# matplotlib keeps a font cache; keep it in the project, not in ~/.cache.
export MPLCONFIGDIR := $(CURDIR)/data/.cache/matplotlib

.PHONY: install install-dev run dev ingest status test bench clean-state

# torch is installed first, on its own, so that a machine whose pip offers the
# CPU-only torch 2.13.0 wheel on its find-links (CI here) uses it instead of
# resolving the CUDA build with several GB of libraries.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# TORCH_INDEX=https://download.pytorch.org/whl/cpu: the CPU-only build (no CUDA).
TORCH_INDEX ?=
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e .
	@# An environment made before nvidia-ml-py replaced the deprecated "pynvml"
	@# shim (pyproject.toml) keeps the shim and its import hook, run at every
	@# Python start. Remove it, then put back nvidia-ml-py's pynvml.py, which
	@# the shim's removal may take with it (both ship that file).
	if $(BIN)/pip show --quiet pynvml 2>/dev/null; then \
	    $(BIN)/pip uninstall --quiet --yes pynvml && \
	    $(BIN)/pip install --quiet --force-reinstall --no-deps \
	        "nvidia-ml-py==$$($(BIN)/pip show nvidia-ml-py | sed -n 's/^Version: //p')"; \
	fi
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

## Process the bundled sample recordings end to end and print a status table.
run: install
	$(BIN)/voiceman run --samples

## Register what is in data/inbox/ and process it.
ingest: install
	$(BIN)/voiceman run

status: install
	$(BIN)/voiceman status

## The Dagster UI on http://127.0.0.1:$(PORT) (assets, partitions, sensor, backfills).
PORT ?= 3000
dev: install
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p $(PORT)

## The test suite (what CI runs): two test processes, each taking whole modules.
test: install-dev
	$(BIN)/pytest -n 2 --dist loadfile

bench: install-dev
	$(BIN)/python bench/stt_quality.py
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/throughput.py

## Forget all runs and outputs (keeps data/samples and the inbox).
clean-state:
	rm -rf data/dagster data/outputs/*
