# The two commands: `make run` (the demonstration, local mode) and `make test` (the test suite).
# `make run-main` runs one training job (python -m mopd_ray.main) with ARGS as Hydra overrides.
# Both first run launch/setup_local.sh, which creates .venv and installs everything (seconds when
# nothing changed). Pass Hydra overrides with ARGS="...", pytest options with PYTEST_ARGS="...".
VENV ?= .venv
PY := $(VENV)/bin/python
SUITE_BUDGET_S := 780
FAST_BUDGET_S := 180
# The suite runs on two pytest-xdist workers, a whole test file per worker at a time (module-scoped runs and
# warm engines stay in one process), in the order tests/conftest.py gives (the longest files first); it is
# CPU-bound, so more workers than cores only add contention.
PYTEST_WORKERS ?= 2

.PHONY: setup run run-main test test-fast lint-docker clean-artifacts

setup:
	@bash launch/setup_local.sh

run: setup
	$(PY) -m mopd_ray.demo $(ARGS)

run-main: setup
	$(PY) -m mopd_ray.main $(ARGS)

# Both print the ten slowest tests (pytest.ini_options: --durations=10) and the suite's wall time against
# its budget (CONTRIBUTING.md): a feature that needs more time makes other tests cheaper.
test: setup
	@start=$$(date +%s); $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS); rc=$$?; \
	echo "[suite] wall time $$(( $$(date +%s) - start )) s (budget $(SUITE_BUDGET_S) s, CONTRIBUTING.md)"; exit $$rc

test-fast: setup
	@start=$$(date +%s); $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow" $(PYTEST_ARGS); rc=$$?; \
	echo "[suite] fast tests: wall time $$(( $$(date +%s) - start )) s (budget $(FAST_BUDGET_S) s)"; exit $$rc

lint-docker: setup
	$(VENV)/bin/hadolint docker/Dockerfile.gpu docker/Dockerfile.cpu

clean-artifacts:
	rm -rf artifacts outputs multirun
