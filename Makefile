# The README's two commands: `make demo` and `make test`.
# Both create .venv on first use and (re)install when pyproject.toml changes.

# The project needs Python 3.11 or newer: python3.11 where it is installed, else python3.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || echo python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Prefect's telemetry tries to resolve a host; the pipeline runs offline.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 180
export PYTHONUNBUFFERED := 1

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@df -h . | awk 'NR==2 {print "disk free for .venv: " $$4 " (the install takes about 7 GB: torch with its CUDA libraries)"}'
	$(PY) -m pip install -q --no-cache-dir -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/t2i run --preset cpu-demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf data mlflow.db mlartifacts
