# Each target creates .venv if it is missing, so a fresh clone needs nothing else.
# torch and torchvision are pinned here only to pick the wheels this machine keeps on disk;
# the package itself declares ranges (pyproject.toml).
PY      := .venv/bin/python
TORCH   := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test bench clean

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

# detrkit against Hugging Face DETR-R50, side by side (docs/benchmarks.md); about 5 minutes on 2 cores.
bench: .venv/installed
	$(PY) benchmarks/bench.py --ablation --json runs/bench.json

clean:
	rm -rf .venv runs build src/*.egg-info
