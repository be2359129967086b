# Each target creates .venv if it is missing, so a fresh clone needs nothing else.
# torch and torchvision are pinned here only to pick the wheels this machine keeps on disk;
# the package itself declares ranges (pyproject.toml).
PY      := .venv/bin/python
TORCH   := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test bench bench-peers clean

.venv/installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH) || $(PY) -m pip install -q "torch>=2.4" "torchvision>=0.19"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: .venv/installed
	$(PY) -m detrkit demo

test: .venv/installed
	$(PY) -m pytest -q tests

# detrkit against Hugging Face DETR-R50 and RT-DETR-R18 (--only rtdetr), side by side (docs/benchmarks.md);
# about 6 minutes on 2 cores.
bench: .venv/installed
	$(PY) benchmarks/bench.py --ablation --json runs/bench.json

# Ultralytics, for benchmarks/peers.py only (never a dependency of detrkit): a venv of its own.
PEERS_PY := .venv-peers/bin/python
.venv-peers/installed:
	test -x $(PEERS_PY) || python3 -m venv .venv-peers
	$(PEERS_PY) -m pip install -q --upgrade pip
	$(PEERS_PY) -m pip install -q $(TORCH) ultralytics==8.4.190
	touch $@

# detrkit against Ultralytics YOLO11n and RT-DETR: the same CPU minutes on the same data, one COCO
# evaluator (docs/benchmarks.md). Three models on two sets: about 3 x (10 + 15) minutes of training
# plus data, evaluation and prediction, well over 1.5 hours; run it on an idle machine.
PEERS_DEMO_MINUTES    ?= 10
PEERS_STANDIN_MINUTES ?= 15
bench-peers: .venv/installed .venv-peers/installed
	$(PY) -m detrkit synth data/synthetic/shapes-128
	$(PY) -m detrkit synth data/stand-in-640 --image-size 640 --object-size 8 64 --num-train 3000 --num-val 300
	$(PY) benchmarks/peers.py --data data/synthetic/shapes-128 --minutes $(PEERS_DEMO_MINUTES) \
		--peer-python $(PEERS_PY) --out runs/peers/demo
	$(PY) benchmarks/peers.py --data data/stand-in-640 --minutes $(PEERS_STANDIN_MINUTES) \
		--peer-python $(PEERS_PY) --out runs/peers/stand-in-640

clean:
	rm -rf .venv .venv-peers runs build src/*.egg-info
