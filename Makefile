# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv and install everything.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmcst-installed

.PHONY: demo demo-quick test bench install install-crf clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The optional dense CRF (pydensecrf2, built from source: needs a C++ compiler). Without it, the CRF tests
# skip and confident labels use the torch-only PAR refinement.
install-crf: $(STAMP)
	$(PY) -m pip install -q -e '.[crf]'

demo: $(STAMP)
	$(VENV)/bin/mmcst demo --out demo_out

demo-quick: $(STAMP)
	$(VENV)/bin/mmcst demo --quick --out demo_out/quick

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m benchmarks.eval_speed

clean:
	rm -rf $(VENV) demo_out runs .pytest_cache
