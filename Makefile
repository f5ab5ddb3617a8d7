# make demo: create .venv, install requirements.lock, run the six stages on real CarRacing-v3 (configs/smoke.yaml)
# make test: create .venv, install requirements.lock, run the test suite
# make lock: regenerate requirements.lock (exact pins + sha256 hashes, Linux x86_64 / CPython 3.11,
#            torch 2.13.0+cpu from /opt/wheels) from requirements.txt with pip-compile;
#            keeps existing pins where still allowed, `make lock LOCK_ARGS=--upgrade` bumps them all
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_CONFIG ?= configs/smoke.yaml
STAGES := 01_generate_rollouts 02_train_nvae 03_encode_latents 04_train_mdnrnn 05_train_controller 06_evaluate
LOCK_TOOL := pip-tools==7.6.2
TORCH_WHEELS ?= /opt/wheels
LOCK_ARGS ?=

.PHONY: install lock demo test bench clean-demo iterate watch

$(STAMP): requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes -r requirements.lock
	touch $(STAMP)

# pip-compile runs in a throwaway venv; --find-links makes it take (and hash) the local
# CPU torch wheel and is written into the lock, so installs never fetch a CUDA build.
lock:
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/pip" install --quiet $(LOCK_TOOL); \
	"$$tmp/venv/bin/pip-compile" --quiet --generate-hashes --allow-unsafe --strip-extras \
		--no-emit-index-url --find-links=$(TORCH_WHEELS) $(LOCK_ARGS) \
		--output-file=requirements.lock requirements.txt; \
	{ echo "# Lock of requirements.txt for Linux x86_64, CPython 3.11 (what CI runs): exact versions"; \
	  echo "# and sha256 hashes; torch is the CPU wheel 2.13.0+cpu from $(TORCH_WHEELS)."; \
	  echo "# Installed by make install/demo/test (pip install --require-hashes -r requirements.lock)."; \
	  echo "# Do not edit: change requirements.txt, then refresh with: make lock"; \
	  cat requirements.lock; } > "$$tmp/lock"; \
	mv "$$tmp/lock" requirements.lock

install: $(STAMP)

demo: $(STAMP)
	@set -e; for stage in $(STAGES); do \
		echo "==> $$stage --config $(DEMO_CONFIG)"; \
		$(PY) $$stage.py --config $(DEMO_CONFIG); \
	done

test: $(STAMP)
	$(PY) -m pytest -q --durations=10 tests

# make iterate CONFIG=configs/carracing_iterative_vae.yaml [SET="iterative.rounds=4"]: iterative training,
# round after round (utils/iterative.py); rerun the same command to resume
iterate: $(STAMP)
	$(PY) -m utils.iterative --config $(CONFIG) $(if $(SET),--set $(SET))

# make watch [WATCH_AGENT=agents/NAME/agent.pt WATCH_EPISODES=N]: play a shipped agent on held-out tracks on the
# CPU (06_evaluate.py --agent): prints mean +- std, writes runs/watch/eval/world_model.gif (real frame, V's
# reconstruction, M's dream side by side), episode.gif and report.md
WATCH_AGENT ?= agents/carracing_vae/agent.pt
WATCH_EPISODES ?= 5
watch: $(STAMP)
	$(PY) 06_evaluate.py --agent $(WATCH_AGENT) --set evaluate.episodes=$(WATCH_EPISODES) run_dir=runs/watch

bench: $(STAMP)
	$(PY) benchmarks/throughput.py

clean-demo:
	rm -rf runs/smoke
