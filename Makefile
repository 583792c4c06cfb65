# syncagent: the two commands a new machine needs are `make demo` and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin

.PHONY: demo test lint bench install postgres-binaries clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,fast,jwt]'
	touch $@

install: $(BIN)/.installed

# The demo and the tests start throwaway PostgreSQL clusters from the installed server
# binaries; install the distribution's server package when there are none.
postgres-binaries:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || \
	  { echo "installing PostgreSQL server binaries (postgresql package)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql postgresql-contrib; }

demo: install postgres-binaries
	$(BIN)/syncagent demo

lint: install
	$(BIN)/ruff check agent connectors state tests bench
	$(BIN)/ruff format --check agent connectors state
	$(BIN)/mypy agent connectors state

test: lint postgres-binaries
	$(BIN)/pytest -q

bench: install postgres-binaries
	$(BIN)/python -m bench.report

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache bench/out
