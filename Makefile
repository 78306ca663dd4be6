# `make demo` and `make test` both build .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo train-demo train-distributed-demo upcycle-demo test docs bench bench-report clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# This pin takes the CPU wheel that lies on this machine's disk; an unpinned
	# torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# mamba_ssm without its CUDA extension (sparsify gives it a CPU path); the flags skip the CUDA build.
	MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE $(PY) -m pip install -q --no-build-isolation 'mamba-ssm==2.3.2.post1'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) demos/convert_tiny_transformer.py

# Dense vs MoT vs MoM on a mixed-modality corpus (~10 min a seed on 2 CPU cores; --seeds 3 for the spread); curves in demos/out/.
train-demo: $(STAMP)
	$(PY) demos/train_multimodal.py

# The FSDP2 recipe under torchrun on 2 CPU processes (gloo): 20 steps, DCP checkpoints every 5 (--resume continues).
train-distributed-demo: $(STAMP)
	$(VENV)/bin/torchrun --standalone --nproc_per_node 2 demos/train_distributed.py --steps 20

# Upcycle a text-pretrained Llama three ways (dense, MoT with text frozen, MoT all trainable), 3 seeds (~5 min).
upcycle-demo: $(STAMP)
	$(PY) demos/upcycle.py --seeds 3

# One worker per core (pytest-xdist), a test file per worker so module fixtures are built once: most of the
# suite is single-threaded tracing and subprocess start, so two workers on two cores halve its time. At most
# four: each worker holds torch and transformers (~1.5 GB with its models), and the gloo tests spawn two more.
test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile

# The documentation site (mkdocs, API and CLI references generated from the code) into site/; strict: a broken
# link or reference fails the build (tests/test_docs.py builds it in `make test` too).
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

bench: $(STAMP)
	$(PY) benchmarks/bench_routed_ops.py

# Every benchmark at its default size (~15-20 min on 2 CPU cores): docs/benchmarks.md and the README's table.
bench-report: $(STAMP)
	$(PY) benchmarks/report.py

clean:
	rm -rf $(VENV) build site *.egg-info
