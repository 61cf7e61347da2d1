# ccld-trt: `make sample PROMPT="..."` installs and generates; `make test` runs the test suite.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
MODELS  ?= models
PROMPT  ?= a snowy landscape, oil on canvas
BACKEND ?= torch
DEVICE  ?= cpu
BUILD   ?= build

.PHONY: install sample models onnx engines bench lint typecheck test serve doctor

$(BIN)/ccld-trt: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	# tensorrt-rtx: real engines are built ahead of time, here and in CI, without a GPU
	$(BIN)/pip install -q -e '.[dev,serve,tensorrt-rtx,cluster,openvino]'
	# a test oracle (tests/test_solver_peers.py): only its sampling.py is loaded; its dependencies would pull torchvision
	$(BIN)/pip install -q --no-deps k-diffusion==0.1.1
	touch $@

install: $(BIN)/ccld-trt

# Real weights if they download, else loudly-labelled random demo weights so the pipeline still runs offline.
$(MODELS)/model_student.ckpt: | install
	$(BIN)/ccld-trt download --models $(MODELS) || $(BIN)/ccld-trt demo-weights $(MODELS) --size full

models: $(MODELS)/model_student.ckpt

sample: models
	$(BIN)/ccld-trt sample "$(PROMPT)" --models $(MODELS) --backend $(BACKEND) --device $(DEVICE)

onnx: models
	$(BIN)/ccld-trt export --models $(MODELS)

# Without a GPU: TensorRT-RTX engines for RTX GPUs (compute 8.0, 8.6, 8.9, 12.0); with a GPU and TensorRT: for that
# GPU. Exports what is missing first; an engine whose sidecar still matches is kept.
TRT_FLAVOR ?= auto
engines: models
	CCLD_TRT_BUILD=$(BUILD) $(BIN)/ccld-trt engines build --models $(MODELS) --output $(BUILD)/engines \
	  --trt-flavor $(TRT_FLAVOR)

bench: models
	$(BIN)/ccld-trt bench --models $(MODELS)

serve: models
	$(BIN)/ccld-trt serve --models $(MODELS) --backend $(BACKEND) --device $(DEVICE)

doctor: install
	$(BIN)/ccld-trt doctor

lint: install
	$(BIN)/ruff check .

typecheck: install
	PY=$(BIN)/python scripts/typecheck.sh

test: lint typecheck
	$(BIN)/pytest -q
