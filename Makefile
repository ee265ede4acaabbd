# The two commands: `make run` (the demonstration, local mode) and `make test` (the test suite).
# `make run-main` runs one training job (python -m mopd_ray.main) with ARGS as Hydra overrides.
# Both first run launch/setup_local.sh, which creates .venv and installs everything (seconds when
# nothing changed). Pass Hydra overrides with ARGS="...", pytest options with PYTEST_ARGS="...".
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run run-main test test-fast lint-docker clean-artifacts

setup:
	@bash launch/setup_local.sh

run: setup
	$(PY) -m mopd_ray.demo $(ARGS)

run-main: setup
	$(PY) -m mopd_ray.main $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint-docker: setup
	$(VENV)/bin/hadolint docker/Dockerfile.gpu docker/Dockerfile.cpu

clean-artifacts:
	rm -rf artifacts outputs multirun
