# Two entry points: `make serve` (a working server on the embedded default model, CPU) and
# `make test` (the whole suite). Both bootstrap a virtual environment in .venv first: serve with
# the runtime dependencies alone (what `pip install adrenaline` brings), test with the test extras.
VENV ?= .venv
PY := $(VENV)/bin/python
RUNTIME_STAMP := $(VENV)/.installed-runtime
TEST_STAMP := $(VENV)/.installed-test
ARGS ?=

.PHONY: serve test lint bootstrap clean gpu-wheelhouse

bootstrap: $(TEST_STAMP)

$(RUNTIME_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch; a bare `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $(RUNTIME_STAMP)

$(TEST_STAMP): $(RUNTIME_STAMP)
	$(PY) -m pip install -q -e '.[test]'
	touch $(TEST_STAMP)

serve: $(RUNTIME_STAMP)
	$(VENV)/bin/adrenaline serve $(ARGS)

test: $(TEST_STAMP)
	$(PY) -m pytest -q -ra $(ARGS)

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .

# Wheels for a GPU machine without PyPI (CPython 3.12, x86_64) holding what scripts/gpu_check.sh
# installs offline beside its torch and triton. numpy is left out: the machine's torch brings
# its own. About 10 MB; carry the folder along with the checkout.
GPU_WHEELHOUSE ?= .gpu-wheelhouse
GPU_PACKAGES := pyzmq msgspec fastapi uvicorn gguf pydantic openai "setuptools>=68"
gpu-wheelhouse:
	python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
	    --abi cp312 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	    --platform manylinux2014_x86_64 -d $(GPU_WHEELHOUSE) $(GPU_PACKAGES)
	rm -f $(GPU_WHEELHOUSE)/numpy-*.whl
	@ls $(GPU_WHEELHOUSE) | wc -l | xargs echo "wheels in $(GPU_WHEELHOUSE):"

clean:
	rm -rf $(VENV) .pytest_cache
