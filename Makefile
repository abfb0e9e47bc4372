# The two commands of the README: `make demo` and `make test`. Both set everything up on a fresh
# machine with Python 3.11 and make: a .venv with the pinned server stack (requirements.lock).
# Two distributions: edgekit-sdk (edgekit + tools, this folder) and edgekit-device-agent (device_agents/).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# uv installs the pinned stack (pip took 2.5 minutes of make test's set-up; same versions, same lock), compiling the
# bytecode as pip does: where PYTHONDONTWRITEBYTECODE is set, Python never writes it, and every import of TensorFlow
# compiled it again (19 s of CPU against 7 s). pip installs uv itself, at the version the lock pins (Flower needs it).
UV := $(BIN)/uv
# A second, device-like environment: tflite-runtime 2.14 needs numpy < 2 (see README).
TFLRT_VENV := .venv-tflite-runtime
TFLRT_STAMP := $(TFLRT_VENV)/.installed
# A device environment for fleet tests: the device wheel with its [fl] extra (LiteRT + Flower), no TensorFlow.
DEVICE_VENV := .venv-device
DEVICE_STAMP := $(DEVICE_VENV)/.installed
DEVICE_SOURCES := $(wildcard device_agents/*.py device_agents/*/*.py) device_agents/pyproject.toml
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export TF_CPP_MIN_LOG_LEVEL := 3
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: install demo test test-all test-slow lint docs doctest bench dist clean

install: $(STAMP)

$(STAMP): pyproject.toml device_agents/pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c requirements.lock uv
	$(UV) pip install -q --compile-bytecode --python $(BIN)/python -c requirements.lock --upgrade "pip>=24" setuptools wheel \
		-e ./device_agents -e ".[dev]"
	touch $(STAMP)

# Both wheels: dist/edgekit_sdk-*.whl (server) and dist/edgekit_device_agent-*.whl (device), built once for both
# device environments (DIST_STAMP), so make can build those in parallel.
DIST_STAMP := dist/.built

dist:
	rm -f $(DIST_STAMP)
	$(MAKE) $(DIST_STAMP)

$(DIST_STAMP): $(STAMP) $(DEVICE_SOURCES) pyproject.toml
	rm -rf dist
	$(BIN)/python -m pip wheel -q --no-deps --no-build-isolation -w dist ./device_agents .
	rm -rf build device_agents/build
	touch $(DIST_STAMP)

# A device-like environment: the device wheel installed as a device installs it, next to tflite-runtime.
$(TFLRT_STAMP): $(DIST_STAMP)
	rm -rf $(TFLRT_VENV)
	$(PYTHON) -m venv $(TFLRT_VENV)
	$(UV) pip install -q --compile-bytecode --python $(TFLRT_VENV)/bin/python "numpy<2" "tflite-runtime==2.14.0" \
		dist/edgekit_device_agent-*.whl
	touch $(TFLRT_STAMP)

$(DEVICE_STAMP): $(DIST_STAMP) requirements.lock
	rm -rf $(DEVICE_VENV)
	$(PYTHON) -m venv $(DEVICE_VENV)
	$(UV) pip install -q --compile-bytecode --python $(DEVICE_VENV)/bin/python -c requirements.lock \
		"$$(ls dist/edgekit_device_agent-*.whl)[fl]"
	touch $(DEVICE_STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py --out demo_out

# make test: every module and boundary, each attack reproduced on real components (under 15 minutes on 2 cores).
# make test-all: also the slow tier (pytest -m slow: long end-to-end journeys, keras.applications architectures).
PYTEST := $(BIN)/python -m pytest -q -p no:cacheprovider -n 4 --dist loadgroup --durations=25

# The two device environments, the docs and the doctests are independent: built side by side (-j4).
test: $(STAMP)
	$(BIN)/ruff check edgekit tools device_agents tests benchmarks examples docs
	$(MAKE) -j4 $(TFLRT_STAMP) $(DEVICE_STAMP) docs doctest
	$(PYTEST) -m "not slow" tests

test-all: $(STAMP)
	$(BIN)/ruff check edgekit tools device_agents tests benchmarks examples docs
	$(MAKE) -j4 $(TFLRT_STAMP) $(DEVICE_STAMP) docs doctest
	$(PYTEST) tests

test-slow: $(STAMP) $(TFLRT_STAMP) $(DEVICE_STAMP)
	$(PYTEST) -m slow tests

# The docs site (docs/, Sphinx + MyST + Furo) in docs/_build/html; warnings are errors.
docs: $(STAMP)
	rm -rf docs/_generated
	$(BIN)/python -m sphinx -j auto -W --keep-going -q -b html docs docs/_build/html

# Every example in the docstrings and in the docs' pages runs (`>>>` lines; +SKIP marks those that need a model).
doctest: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -o testpaths= --doctest-modules --doctest-glob='*.md' \
		--ignore=docs/conf.py --ignore=docs/_build edgekit device_agents tools docs README.md

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/compress.py
	$(BIN)/python benchmarks/agent.py
	$(BIN)/python benchmarks/federated.py
	$(BIN)/python benchmarks/conformance.py
	$(BIN)/python benchmarks/batchnorm.py
	$(BIN)/python benchmarks/entropy.py
	$(BIN)/python benchmarks/remedies.py
	$(BIN)/python benchmarks/fleet.py
	$(BIN)/python benchmarks/peers.py

clean:
	rm -rf $(VENV) $(TFLRT_VENV) $(DEVICE_VENV) demo_out dist build docs/_build docs/_generated
