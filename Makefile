# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv on first use, install the package editable with its test extra (hqq without its CUDA
# kernels, autoawq 0.2.9 with --no-deps),
# and skip the install on later runs unless setup.cfg / pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.xqpass-installed
export PJRT_DEVICE ?= CPU

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	DISABLE_CUDA=1 $(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps autoawq==0.2.9
	touch $(STAMP)

demo: setup
	$(PY) -m xqpass.demo

test: setup
	$(PY) -m pytest -q

# benchmarks (not tests): about 40 minutes on the 2-core machine (bench_generate most of it); results and the plot go to the repo
bench: setup
	DISABLE_CUDA=1 $(PY) -m pip install --quiet -e '.[test,bench]'
	mkdir -p benchmarks/results
	$(PY) benchmarks/bench_matmul.py --m 1 4 16 32 64 256 --shapes 4096x4096 4096x11008 --json benchmarks/results/matmul.json
	$(PY) benchmarks/bench_matmul.py --fp8 --m 1 16 256 --shapes 4096x4096 --json benchmarks/results/matmul_fp8.json
	$(PY) benchmarks/bench_library_layers.py --size 4096 --rows 1 16 --json benchmarks/results/library_layers.json
	$(PY) benchmarks/bench_decoder.py --json benchmarks/results/decoder.json
	$(PY) benchmarks/bench_load.py --runs 5 --json benchmarks/results/load.json
	$(PY) benchmarks/bench_pass.py --runs 7 --json benchmarks/results/pass.json
	$(PY) benchmarks/bench_generate.py --sizes 1024x8 --batches 1 8 --json benchmarks/results/generate.json
	$(PY) benchmarks/bench_generate.py --sizes 2048x16 --batches 1 --rounds 2 --runs 3 --paths "eager bf16" "openxla bf16" "xq_openxla int8" "xq_openxla int4 g128" --json benchmarks/results/generate_2048.json
	$(PY) benchmarks/bench_moe.py --tokens 1 16 256 --json benchmarks/results/moe.json
	$(PY) benchmarks/bench_moe.py --decode --hidden 1024 --n 2816 --layers 2 --runs 3 --json benchmarks/results/moe_decode.json
	$(PY) benchmarks/plot.py benchmarks/results/matmul.json docs/benchmarks.png
	$(PY) benchmarks/plot_generate.py benchmarks/results/generate.json docs/generate.png

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
