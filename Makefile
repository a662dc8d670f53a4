# The two quick-start commands. Each creates .venv on first use and installs what it needs.
#   make demo   tiny models -> encoder server -> image (offline, CPU, about a minute)
#   make test   stub check, ruff, mypy and the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build on machines that
# offer a CPU wheel locally. Override TORCH_SPEC to use another build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[server,client,dev]"
	touch $@

demo: install
	$(BIN)/flux2-client demo

lint: install
	$(BIN)/python -m flux2split_proto.generate --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy proto/flux2split_proto encoder_server/flux2_encoder_server client/flux2_client

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out
