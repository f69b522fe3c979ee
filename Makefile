# qlp-compress: `make demo` runs the main job on the shipped model, `make test` runs the tests.
# Both set up what they need (a .venv with the package, the Fashion-MNIST data) on a fresh machine.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
QLP    := $(BIN)/qlp-compress
FMNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

.PHONY: setup data demo test test-fast lint architecture models bench bench-quick export-check fuzz gpu-check scale clean

setup: $(VENV)/.installed data

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Fashion-MNIST from Debian's dataset-fashion-mnist package (the tool also finds it via --data-dir,
# $$QLP_DATA_DIR or ~/.cache/qlp-compress, and downloads it where there is internet).
data:
	@if [ ! -f $(FMNIST) ] && [ -z "$$QLP_DATA_DIR" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $$SUDO apt-get update >/dev/null && $$SUDO apt-get install -y dataset-fashion-mnist >/dev/null; } || \
	  echo "note: could not install dataset-fashion-mnist; set QLP_DATA_DIR to a folder with the idx files"; \
	fi

demo: setup
	$(QLP) search models/resnet20_fmnist.onnx --sparsity 0.9 --out out/demo --force

# The tests run on up to 4 processes (pytest-xdist; each test keeps one torch thread), work-stealing so that the
# long end-to-end runs do not leave a core idle at the end.
JOBS   ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)
PYTEST := $(BIN)/pytest -n $(JOBS) --dist worksteal

test: setup
	$(PYTEST)

# The inner loop: everything but the end-to-end runs (under a minute on 2 cores).
test-fast: setup
	$(PYTEST) -m "not slow"

lint: setup
	$(BIN)/ruff check qlp_compress tests benchmarks tools

# Rewrite docs/architecture.md from the code (tests/test_architecture.py fails when it is stale).
architecture: setup
	$(BIN)/python tools/architecture.py

# Rebuild the shipped baselines (about 1 h for ResNet-20 on 2 CPU cores; resumable with RESUME=--resume).
models: setup
	$(QLP) train resnet20 --data fashion-mnist --epochs 20 --seed 0 --out models/resnet20_fmnist.onnx --force $(RESUME)

# A tiny end-to-end run on the shipped model; fails unless the exported files verify.
export-check: setup
	$(QLP) search models/resnet20_fmnist.onnx --sparsity 0.8 --episodes 8 --stages 2 --reward-images 200 \
	  --finetune-epochs 0.02 --out out/export-check --force
	$(QLP) evaluate out/export-check/model.onnx --repeats 3 --json > out/export-check/evaluate.json
	$(QLP) evaluate out/export-check/model.sparse.onnx --repeats 3 --json > out/export-check/evaluate.sparse.json

bench: setup
	$(BIN)/python benchmarks/run.py --grid full

bench-quick: setup
	$(BIN)/python benchmarks/run.py --grid quick

# Damaged inputs through the CLI (mutated ONNX, .npz and policy.json files); every case must end in a correct result
# or a one-line error. About 0.2 s per case on 2 CPU cores. The test suite runs 100 at seed 0 (every kind of damage and both outcomes occur).
FUZZ_CASES ?= 2000
FUZZ_SEED ?= 1
fuzz: setup
	$(BIN)/python benchmarks/fuzz.py --mutations $(FUZZ_CASES) --seed $(FUZZ_SEED) --json benchmarks/results/fuzz.json \
	  --keep out/fuzz-failures

# Every CUDA path (the reward on the GPU and its agreement with the CPU reward, a short search with fine-tuning,
# evaluate and int8 through onnxruntime's CUDA provider) in under 5 minutes; prints "no GPU" without one.
gpu-check: setup
	$(BIN)/python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json

# Ray reward workers on this machine: episodes/s, the identical-policy check, a worker killed mid-search
# (docs/benchmarks_scale.md, "Ray rewards"). Run it on a quiet machine.
scale: setup
	$(BIN)/python benchmarks/scale.py

clean:
	rm -rf out .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
