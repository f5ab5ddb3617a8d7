# make demo: create .venv, install, run the six stages on real CarRacing-v3 (configs/smoke.yaml)
# make test: create .venv, install, run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_CONFIG ?= configs/smoke.yaml
STAGES := 01_generate_rollouts 02_train_nvae 03_encode_latents 04_train_mdnrnn 05_train_controller 06_evaluate

.PHONY: install demo test bench clean-demo

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@set -e; for stage in $(STAGES); do \
		echo "==> $$stage --config $(DEMO_CONFIG)"; \
		$(PY) $$stage.py --config $(DEMO_CONFIG); \
	done

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/throughput.py

clean-demo:
	rm -rf runs/smoke
