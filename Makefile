# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_ARGS ?= --steps 3000
CARTPOLE_ARGS ?=

.PHONY: run test bench lint install clean cartpole

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first: a looser requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# rl: gymnasium and stable-baselines3, for examples/cartpole_swarm and its test.
	$(BIN)/pip install -q -e '.[test,dev,rl]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/swarm-aggregator demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

cartpole: $(STAMP)
	$(BIN)/python -m examples.cartpole_swarm $(CARTPOLE_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check processor transports tests bench examples
	$(BIN)/mypy --strict processor transports

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
