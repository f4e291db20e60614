# Two commands do the whole set-up on a fresh machine with Python 3.11:
#   make bench   -> creates .venv, installs quantbench, runs the default job and prints the leaderboard
#   make test    -> creates .venv, installs quantbench + test deps, runs the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# No hub on this machine: OFFLINE=1 uses the package-shipped models/data. `make bench OFFLINE=0` uses the hub.
OFFLINE ?= 1
ifeq ($(OFFLINE),1)
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
endif

.PHONY: install bench test lint clean leaderboard study

$(BIN)/bench: pyproject.toml requirements-offline.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU wheel first: the range in pyproject is then already satisfied (no CUDA download).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,gguf,ray]'
	$(BIN)/pip install -q --no-deps -r requirements-offline.txt
	touch $(BIN)/bench

install: $(BIN)/bench

bench: install
	$(BIN)/bench run --methods rtn --bits 4,8 --tasks sst2 --name default

test: install
	$(BIN)/python -m pytest -q

# results/published: the committed reference study (benchmarks/study.py). leaderboard re-renders its tables,
# README.md and index.html from the committed rows (seconds); study reruns/resumes its grids (hours on 2 cores).
leaderboard: install
	$(BIN)/python benchmarks/study.py render

study: install
	$(BIN)/python benchmarks/study.py run

lint: install
	$(BIN)/ruff check bench methods tasks tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
