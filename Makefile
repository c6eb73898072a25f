# digitrec: `make run` sets everything up and trains the default model; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DIGITREC := $(VENV)/bin/digitrec
STAMP := $(VENV)/.installed

.PHONY: setup data run test test-slow browser lint results pretrained serve bench bench-train bench-infer bench-serve bench-faults docs typecheck clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned, so that nothing pulls a multi-GB CUDA build; then the project with its dev extras.
# TORCH_PIP_ARGS picks where torch comes from, e.g. --index-url https://download.pytorch.org/whl/cpu
TORCH_PIP_ARGS ?=
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet torch==2.13.0 $(TORCH_PIP_ARGS)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

data: setup
	$(DIGITREC) data

run: setup
	$(DIGITREC) data
	$(DIGITREC) train --recipe default --out runs/default --overwrite
	@echo "open runs/default/report.html to see the report"

# Chromium for the browser test: installed with apt-get where we can (root or sudo); the test skips without it,
# so a machine where it cannot be installed says so in one warning line rather than skipping them unannounced.
CHROMIUM_FOUND = [ -n "$$DIGITREC_CHROMIUM" ] || command -v chromium || command -v chromium-browser || command -v google-chrome
browser:
	@{ $(CHROMIUM_FOUND); } >/dev/null 2>&1 || { \
	  if ! command -v apt-get >/dev/null 2>&1; then why="there is no apt-get here"; \
	  elif [ "$$(id -u)" = 0 ]; then why="apt-get install chromium failed"; \
	    { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || true; \
	  elif command -v sudo >/dev/null 2>&1; then why="sudo -n apt-get install chromium failed (not root; sudo may want a password)"; \
	    sudo -n apt-get install -y -qq chromium >/dev/null 2>&1 || true; \
	  else why="apt-get needs root, and there is no sudo"; fi; \
	  { $(CHROMIUM_FOUND); } >/dev/null 2>&1 || echo "warning: Chromium is not installed ($$why), so the browser tests (tests/test_browser.py) will be skipped; install chromium or set DIGITREC_CHROMIUM to a Chromium or Chrome binary." >&2; }

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

test: setup browser
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy src
	$(PY) -m pytest --timeout 900  # a test that hangs fails in 15 minutes instead of holding CI to its limit

test-slow: setup
	$(PY) -m pytest -m slow --timeout 1800  # a slow test that hangs fails in 30 minutes

results: setup
	$(PY) benchmarks/results.py --seeds 0,1,2,3,4 --spread seed-mlp,seed-mlp-bn,seed-mlp-dropout,seed-lenet,fast,default

# The two bundled models, as DEVELOPERS.md describes (30 minutes on two cores). The fine-tune runs on one
# thread: that is how the bundled weights were made, and a thread count changes the float sums' order.
pretrained: data
	$(DIGITREC) train --recipe robust --out runs/robust --no-progress --overwrite
	$(DIGITREC) calibrate runs/robust --half --out runs/robust/half.safetensors
	OMP_NUM_THREADS=1 $(DIGITREC) finetune --model runs/robust/half.safetensors --no-corrections --no-progress --out runs/robust-finetune
	$(DIGITREC) calibrate runs/robust-finetune --half --out src/digitrec/pretrained/robust.safetensors
	$(DIGITREC) train-pairs --out src/digitrec/pretrained/pairs.safetensors

serve: setup
	$(DIGITREC) serve

bench: bench-train bench-infer

# seconds to 99% for fast, default and seed-cnn-bn, each stopped at the target (2 epochs at most): minutes, not the hour
# seed-cnn-bn's 15 epochs take; README's Performance rows were measured so
bench-train: setup
	$(DIGITREC) bench train --recipes fast,default,seed-cnn-bn --target 0.99 --stop-at-target --max-epochs 2

bench-infer: setup
	$(DIGITREC) bench infer

bench-serve: setup
	$(PY) benchmarks/load_server.py

# bad traffic, bombs, 100 MB bodies and slow clients against `digitrec serve` on 127.0.0.1; MODEL=run/folder to pick one
bench-faults: setup
	$(PY) benchmarks/fault_server.py $(if $(MODEL),--model $(MODEL))

# The tutorial as a site in site/ (MkDocs Material, from the docs extra). Its figures come from the commands each
# one's "Made by" line names (digitrec explore / robustness / evaluate / predict, writing into docs/images); strict, so a
# missing figure or a broken link fails the build. NO_MKDOCS_2_WARNING silences Material's end-of-life banner.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# The type check alone (`make test` runs it too, before the tests).
typecheck: setup
	$(VENV)/bin/mypy src

clean:
	rm -rf runs .pytest_cache test-artifacts
