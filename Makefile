# prunelab — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 5000
STUDY ?= taylor-cnn-fashionmnist
SERVER_DIR ?= .mlflow-server
BACKEND ?= sqlite
SERVER_OPTS ?=
export MLFLOW_TRACKING_URI ?= http://127.0.0.1:$(PORT)
export PATH := $(abspath $(BIN)):$(PATH)

.DEFAULT_GOAL := help
.PHONY: help install server stop-server postgresql run serve test test-fast ui-check browser bench report ui clean lth lth-lenet lth-cpu kmeans resnet18-cifar10 vgg-quick transfer-resnet20 compare compare-cnn compare-resnet20

help: ## list the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'
	@echo "  variables: STUDY=$(STUDY) PORT=$(PORT) BACKEND=$(BACKEND) MLFLOW_TRACKING_URI=$(MLFLOW_TRACKING_URI)"

install: $(VENV)/.installed ## create .venv with pinned deps (idempotent); FashionMNIST from Debian when root

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's dataset-fashion-mnist"; \
	  apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null; } || \
	  echo "could not install dataset-fashion-mnist: the data will be downloaded instead"; fi
	touch $@

server: install $(if $(filter postgresql,$(BACKEND)),postgresql) ## start the MLflow server on 127.0.0.1:$(PORT) (BACKEND=sqlite|postgresql; SERVER_OPTS="--auth ..."; no-op when this folder's server answers, refused when another does)
	$(BIN)/python -m prunelab.server --port $(PORT) --dir $(SERVER_DIR) --backend $(BACKEND) $(SERVER_OPTS)

stop-server: ## stop the MLflow server and PostgreSQL that `make server` started
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m prunelab.server --stop --dir $(SERVER_DIR); fi

# Debian's postgresql for BACKEND=postgresql and its test (installed when missing and root;
# otherwise the server says what is missing and the test skips).
postgresql:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's postgresql"; \
	    { $(APT) update >/dev/null && $(APT) install postgresql >/dev/null; } || echo "could not install postgresql"; \
	  fi; fi

run: server ## the default study end to end (STUDY=...), figures in reports/$(STUDY)
	$(BIN)/mlflow run . -e main -P study=$(STUDY) --env-manager local --experiment-name $(STUDY)

MODEL ?= models:/$(STUDY)@champion
SERVE_PORT ?= 5001
serve: install ## serve MODEL (default: the study's champion) over HTTP on 127.0.0.1:$(SERVE_PORT) with MLflow's scoring server
	$(BIN)/prunelab serve '$(MODEL)' --port $(SERVE_PORT)

# Test files shared out over TEST_WORKERS processes (pytest-xdist), each with its own MLflow
# server; a file stays in one process, so its module fixtures are made once.
TEST_WORKERS ?= 2
test: install postgresql ## the test suite (starts its own server on a free port; TEST_WORKERS=2 processes)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

test-fast: install postgresql ## the tests not marked slow
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m 'not slow'

UI_CHECK_DIR ?= reports/ui-check
ui-check: install browser ## a tiny study on a fresh server, then the MLflow UI in headless Chromium; screenshots in $(UI_CHECK_DIR)
	PRUNELAB_UI_CHECK_DIR=$(abspath $(UI_CHECK_DIR)) $(BIN)/python -m pytest -m ui tests/ui

# Debian's chromium and chromium-driver for the browser check (installed when missing and root).
APT := apt-get -o DPkg::Lock::Timeout=300 -y -qq
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's chromium and chromium-driver"; \
	    $(APT) update >/dev/null && $(APT) install chromium chromium-driver >/dev/null; \
	  else echo "make ui-check needs chromium and chromedriver: install Debian's chromium and chromium-driver"; exit 2; fi; fi

bench: install ## benchmarks: a table of speed ratios measured in one run
	$(BIN)/python benchmarks/bench.py

# The k-means study starts from the reference ResNet20 weights; point these at your copies.
CIFAR_DIR ?= ../shared/data/cifar10-subset
RESNET20 ?= ../shared/models/resnet20-12fca82f.th
lth: server ## lottery tickets, Conv-2 on CIFAR-10: the quick pipeline check, 40 iterations a round (CIFAR_DIR=...)
	$(BIN)/mlflow run . -e main -P study=lth-conv2-cifar10-quick -P data_dir=$(abspath $(CIFAR_DIR)) \
	  -P out_dir=resources/figures/lth-conv2-cifar10-quick --env-manager local --experiment-name lth-conv2-cifar10-quick

lth-lenet: server ## lottery tickets, LeNet-300-100 on the full FashionMNIST (5 trials, 15 rounds, re-init controls)
	$(BIN)/mlflow run . -e main -P study=lth-lenet300-fashionmnist \
	  -P out_dir=resources/figures/lth-lenet300-fashionmnist --env-manager local --experiment-name lth-lenet300-fashionmnist

lth-cpu: server ## lottery tickets, Conv-2 on the CIFAR-10 subset at CPU scale (2 trials, 7 rounds, re-init controls; about an hour on 2 cores; CIFAR_DIR=...)
	$(BIN)/mlflow run . -e main -P study=lth-conv2-cifar10-cpu -P data_dir=$(abspath $(CIFAR_DIR)) \
	  -P out_dir=resources/figures/lth-conv2-cifar10-cpu --env-manager local --experiment-name lth-conv2-cifar10-cpu

kmeans: server ## k-means filter clustering of the pretrained ResNet20 (CIFAR_DIR=..., RESNET20=...)
	$(BIN)/mlflow run . -e main -P study=kmeans-resnet20-cifar10 -P data_dir=$(abspath $(CIFAR_DIR)) \
	  -P overrides="kmeans.weights=$(abspath $(RESNET20))" -P out_dir=resources/figures/kmeans-resnet20-cifar10 \
	  --env-manager local --experiment-name kmeans-resnet20-cifar10

resnet18-cifar10: server ## Taylor pruning of torchvision's ResNet-18 (from scratch) on the CIFAR-10 subset, round_to 8 (2 trials; about 20 min on 2 cores; CIFAR_DIR=...)
	$(BIN)/mlflow run . -e main -P study=taylor-resnet18-cifar10 -P data_dir=$(abspath $(CIFAR_DIR)) \
	  -P out_dir=resources/figures/taylor-resnet18-cifar10 --env-manager local --experiment-name taylor-resnet18-cifar10

# Criteria compared fairly: every criterion pruned to every compression ratio from the same
# trained (or pretrained) network, fine-tuned with the same budget (docs/compare-*.md).
compare: compare-cnn compare-resnet20 ## both criteria comparisons, one after the other

compare-cnn: server ## criteria compared on the default CNN and FashionMNIST: 5 criteria x 4 ratios x 3 trials
	$(BIN)/mlflow run . -e main -P study=compare-cnn-fashionmnist -P out_dir=resources/figures/compare-cnn-fashionmnist \
	  --env-manager local --experiment-name compare-cnn-fashionmnist

compare-resnet20: server ## criteria compared on the pretrained ResNet20 and the CIFAR-10 subset (CIFAR_DIR=..., RESNET20=...)
	@test -f "$(RESNET20)" || { echo "no file RESNET20=$(RESNET20): pass RESNET20=<the CIFAR-10 resnet20 checkpoint, e.g. resnet20-12fca82f.th>"; exit 2; }
	$(BIN)/mlflow run . -e main -P study=compare-resnet20-cifar10 -P data_dir=$(abspath $(CIFAR_DIR)) \
	  -P overrides="compare.weights=$(abspath $(RESNET20))" -P out_dir=resources/figures/compare-resnet20-cifar10 \
	  --env-manager local --experiment-name compare-resnet20-cifar10

# The studies whose figures the README and docs/ show (resources/figures/<study>), each drawn from its
# runs on the server. Those the server has no runs of are named, each with the command that makes
# them; make fails only when it has none of them (or when STUDY=... names one it has not).
FIGURE_STUDIES ?= taylor-cnn-fashionmnist lth-lenet300-fashionmnist lth-conv2-cifar10-cpu kmeans-resnet20-cifar10 taylor-resnet20-dogscats \
  taylor-resnet18-cifar10 compare-cnn-fashionmnist compare-resnet20-cifar10
report: server ## redraw the figures of the README and docs/ into resources/figures (STUDY=... for one study) from the runs on the server
	$(BIN)/prunelab report $(foreach study,$(if $(filter command line,$(origin STUDY)),$(STUDY),$(FIGURE_STUDIES)),--study $(study)) \
	  --out 'resources/figures/{study}'

# The VGG16 dogs-vs-cats study at CPU scale (32 px, random features: no weights offline).
DATA_DIR ?= ../shared/data/dogs-vs-cats
VGG_QUICK ?= data.image_size=32 data.n_train=120 data.n_test=100 trials=2 transfer.pretrained=false train.epochs=3 train.optimizer=adam train.lr=0.0001 prune.filters_per_step=512 prune.finetune_epochs_between=1 prune.rank_images=120 prune.latency_repeats=10 finetune.epochs=2

vgg-quick: server ## VGG16 transfer + Taylor pruning at CPU scale; needs DATA_DIR=<folder with train/ and test/>
	@test -d "$(DATA_DIR)" || { echo "no folder DATA_DIR=$(DATA_DIR): pass DATA_DIR=<folder with train/<class>/ and test/<class>/>"; exit 2; }
	$(BIN)/mlflow run . -e main -P study=taylor-vgg16-dogscats -P data_dir=$(abspath $(DATA_DIR)) -P "overrides=$(VGG_QUICK)" -P out_dir=resources/figures/taylor-vgg16-dogscats --env-manager local --experiment-name taylor-vgg16-dogscats

# Transfer pruning with a real pretrained network offline: the CIFAR-10 ResNet20 (RESNET20) as
# the frozen feature extractor for dogs vs cats at 32 px (DATA_DIR).
transfer-resnet20: server ## ResNet20 transfer + Taylor pruning on dogs vs cats (DATA_DIR=..., RESNET20=...)
	@test -d "$(DATA_DIR)" || { echo "no folder DATA_DIR=$(DATA_DIR): pass DATA_DIR=<folder with train/<class>/ and test/<class>/>"; exit 2; }
	@test -f "$(RESNET20)" || { echo "no file RESNET20=$(RESNET20): pass RESNET20=<the CIFAR-10 resnet20 checkpoint, e.g. resnet20-12fca82f.th>"; exit 2; }
	$(BIN)/mlflow run . -e main -P study=taylor-resnet20-dogscats -P data_dir=$(abspath $(DATA_DIR)) \
	  -P overrides="transfer.weights=$(abspath $(RESNET20))" -P out_dir=resources/figures/taylor-resnet20-dogscats \
	  --env-manager local --experiment-name taylor-resnet20-dogscats

ui: server ## print the address of the MLflow UI
	@echo "MLflow UI: $(MLFLOW_TRACKING_URI)"
	@echo "a study's runs: $(MLFLOW_TRACKING_URI)/#/experiments/<id>/runs?workflowType=machine_learning (prunelab run prints the link)"

clean: stop-server ## remove the server's data, reports and caches (keeps .venv)
	rm -rf $(SERVER_DIR) reports mlruns .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
