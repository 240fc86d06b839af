# lightning-stl: common tasks. PYTHON is the interpreter of the environment you installed into.
PYTHON ?= python
ARGS ?=

EXPERIMENT ?= digits
PROFILE ?= quick
JOBS ?= 2

.PHONY: install run test test-all lint format bench reproduce-table1 reproduce-smile clean

install:  ## install the package and the dev tools (editable)
	$(PYTHON) -m pip install -e ".[dev]"

run:  ## Smooth Transfer on the embedded digits pair (extra Hydra overrides in ARGS)
	$(PYTHON) -m lightning_stl.run $(ARGS)

test:  ## the default test suite (slow tests excluded)
	$(PYTHON) -m pytest -q

test-all:  ## every test, the slow ones too
	$(PYTHON) -m pytest -q -m ""

lint:  ## ruff lint and format check
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

bench:  ## speed benchmarks (print ratios)
	$(PYTHON) benchmarks/training_step.py

reproduce-table1:  ## Table 1 + Figure 2 (EXPERIMENT=digits|svhn_mnist|cifar10_cifar100, PROFILE=quick|paper, JOBS=k)
	$(PYTHON) experiments/reproduce_table1.py --experiment $(EXPERIMENT) --profile $(PROFILE) --jobs $(JOBS)

reproduce-smile:  ## SMILE's Table 2 layout + ablations (EXPERIMENT=digits|cub200|stanford_cars|fgvc_aircraft|mit_indoor67|food101)
	$(PYTHON) experiments/reproduce_smile.py --experiment $(EXPERIMENT) --profile $(if $(filter digits,$(EXPERIMENT)),$(PROFILE),paper) --jobs $(JOBS)

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
