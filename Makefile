# Two entry points: `make run` (set up + the main job) and `make test` (set up + lint + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data/glas
MODEL_DIR ?= models
ARGS ?=

.PHONY: setup labelstudio image image-clean run serve demo test lint bench clean

# The one install script, shared with the Dockerfile (tests/test_deploy.py checks both use it);
# here with uv, several times faster than pip on torch's 5.5 GB of wheels.
$(VENV)/.installed: pyproject.toml scripts/install.sh scripts/uv_install.py
	PYTHON=$(PYTHON) INSTALLER=uv scripts/install.sh --editable $(VENV) dev
	touch $@

setup: $(VENV)/.installed

# A real Label Studio for the end-to-end test, in its own venv (about 1 GB), installed by the
# uv of .venv from where pip would (15 s; 60 s with pip).
LSVENV ?= .lsvenv
$(LSVENV)/.installed: | $(VENV)/.installed
	$(PYTHON) -m venv $(LSVENV)
	$(PY) scripts/uv_install.py $(LSVENV)/bin/python label-studio==1.23.2
	touch $@

labelstudio: $(LSVENV)/.installed

# The Dockerfile built with podman on a debootstrapped Debian base (root; tools installed from
# the system's packages when missing; the base and the layer cache are kept, older layers pruned).
# tests/test_container.py runs it. `make image-clean` removes the image.
image:
	scripts/container.sh image

image-clean:
	scripts/container.sh clean

# Train the ensemble on DATA (GlaS layout) and evaluate it; with no DATA folder a synthetic set is made.
run: setup
	@if [ ! -f "$(DATA)/labels.csv" ]; then \
	  echo "no dataset at $(DATA): generating a synthetic one in runs/synthetic"; \
	  $(VENV)/bin/camlabel synth --out runs/synthetic; \
	  $(MAKE) --no-print-directory _run DATA=runs/synthetic ARGS="--members tiny,tiny --image-size 96 --mask-classes lesion --lr 3e-3 --epochs 25 $(ARGS)"; \
	else $(MAKE) --no-print-directory _run; fi

_run:
	$(VENV)/bin/camlabel train --data $(DATA) --out $(MODEL_DIR) $(ARGS)
	$(VENV)/bin/camlabel evaluate --data $(DATA) --model $(MODEL_DIR) --split test --json $(MODEL_DIR)/evaluation.json

# Serve the Label Studio ML backend on :9090 (MODEL_DIR=models; env vars in README).
serve: setup
	MODEL_DIR=$(MODEL_DIR) $(VENV)/bin/camlabel serve

# The whole loop in a browser: Label Studio + the backend on loopback, a synthetic project,
# training, pre-annotations; prints the URLs and login, runs until Ctrl-C (docs/demo.md).
demo: setup labelstudio
	$(VENV)/bin/camlabel demo $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint Dockerfile

# Two pytest workers, a test module each at a time (module fixtures train once), one thread
# each: the Label Studio tests wait on HTTP and subprocesses while the other worker computes.
test: setup labelstudio lint image
	$(VENV)/bin/pytest -q -n 2 --dist loadfile

# Benchmarks (slow; results in bench/results/). GlaS needs DATA; a GPU is used when present.
bench: setup labelstudio
	$(PY) bench/localization.py --data $(DATA) --out bench/results/localization
	$(PY) bench/speed.py --out bench/results/speed.json
	$(PY) bench/load_predict.py --out bench/results/load_predict.json
	$(PY) bench/http_predict.py --out bench/results/http_predict.json
	$(PY) bench/batch_invariance.py --out bench/results/batch_invariance.json
	$(PY) bench/interactive.py --out bench/results/interactive.json
	test -f MODELS/lite_224/CURRENT || $(VENV)/bin/camlabel train --data $(DATA) --out MODELS/lite_224
	$(PY) bench/review_layer.py --data $(DATA) --model MODELS/lite_224 --out bench/results/review_layer.json
	$(PY) bench/interactive_quality.py --data $(DATA) --model MODELS/lite_224 --out bench/results/interactive_quality.json
	$(PY) bench/interactive_quality.py --data $(DATA) --model MODELS/lite_224 --split train \
		--out bench/results/interactive_quality_train.json
	$(PY) bench/interactive_clicks.py --data $(DATA) --model MODELS/lite_224 \
		--out bench/results/interactive_clicks.json
	$(PY) bench/rank_throughput.py --tasks 10000 --out bench/results/rank_throughput.json
	$(PY) bench/learning_curve.py --data $(DATA) \
		--settings random,entropy,random+pseudo,bald,full,random+pseudo+minmax --rounds 4 --k 8
	$(PY) bench/localization.py --data $(DATA) --out bench/results/decoder --configs lite:224,lite:448x320
	$(PY) bench/learning_curve.py --data $(DATA) --settings random,random+pseudo --rounds 4 --k 8 \
		--mask-weight 5 --out bench/results/learning_curve_decoder
	$(PY) bench/job_time.py --data $(DATA) --out bench/results/job_time.json

clean:
	rm -rf $(VENV) $(LSVENV) runs .pytest_cache .ruff_cache
