PYTHON ?= python
NPROC ?= 2

.PHONY: install test lint demo

# Fast when everything is already satisfied.
install:
	$(PYTHON) -m pip install -q -r requirements.txt

test: install
	$(PYTHON) -m pytest

lint:
	$(PYTHON) -m ruff check .

demo: install
	$(PYTHON) -m torch.distributed.run --standalone --nproc_per_node $(NPROC) main.py --cfg configs/demo.yaml
