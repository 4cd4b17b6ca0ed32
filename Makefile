# The two commands of the README, and what they need. Neither assumes uv is
# installed: `setup` installs it with pip (--user) when it is missing, then
# installs the locked environment into .venv (uv.lock; see BUILD_NOTES.md).
#
#   make run    the default experiment on the embedded digits data (ARGS="--flag=value ...")
#   make test   the full test suite (PYTEST_ARGS="-k name ..." to select)

UV = $(shell command -v uv >/dev/null 2>&1 && echo uv || echo python3 -m uv)

.PHONY: setup run test lint

setup:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 \
		|| python3 -m pip install --user --quiet --disable-pip-version-check uv
	@$(UV) sync --frozen --quiet --compile-bytecode

run: setup
	$(UV) run --frozen --no-sync python -m experiments.run $(ARGS)

test: setup
	$(UV) run --frozen --no-sync python -m pytest $(PYTEST_ARGS)

lint: setup
	$(UV) run --frozen --no-sync ruff check fedprune experiments tests
