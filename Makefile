# sfcache: every target creates or refreshes .venv itself, so each works alone on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SF     := $(VENV)/bin/sf
# Here torch==2.13.0 resolves to a CPU wheel on local disk; on a GPU box pip takes the CUDA build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

# reproduce-libero inputs (see README)
LIBERO_DIR ?=
VGGT       ?=
DEVICE     ?= auto
SCHEDULER  ?=
OUT        ?= out/reproduce-libero
REPRO_ARGS ?=

.PHONY: install lint test demo bench bench-closed-loop bench-gpu gpu-wheels reproduce-libero clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,hub,tf,libero,slurm]"
	# the `openpi` extra without its numpy<2 pin (its image_tools needs only numpy and Pillow)
	$(PY) -m pip install -q --no-deps "openpi-client==0.1.2"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m sfcache.cli.demo --out demo-out

bench: $(STAMP)
	$(PY) -m bench.run --out bench-out

# Hours on 2 CPU cores (not in CI): demos -> cache -> SF and baseline policies -> simulator success rates.
# Every stage resumes: run the same line again to continue. CLOSED_LOOP_ARGS e.g. "--stages eval --trials 50".
CLOSED_LOOP_ARGS ?=
bench-closed-loop: $(STAMP)
	$(PY) -m bench.closed_loop --out out/bench-closed-loop $(CLOSED_LOOP_ARGS)

# bench-gpu on a GPU machine. GPU_PY=python3 uses that machine's own torch; the packages its image lacks
# come from .whl/ (made here by `make gpu-wheels`, Python 3.12 x86-64), so it needs no network.
# Dry run on a CPU: make bench-gpu BENCH_GPU_ARGS="--device cpu --preset tiny"
GPU_PY ?= $(PY)
BENCH_GPU_ARGS ?=
GPU_WHEELS := zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 crc32c==2.9.post0 \
              dask==2026.8.0 distributed==2026.8.0 locket==1.0.0 partd==1.4.2 tblib==3.2.2 tornado==6.6.1 \
              zict==3.0.0 simplejpeg==1.9.0

bench-gpu:
	test "$(GPU_PY)" != "$(PY)" || $(MAKE) install
	if [ -d .whl ]; then $(GPU_PY) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
	    --target .whl/site .whl/*.whl; fi
	PYTHONPATH=.whl/site:. $(GPU_PY) -m bench.gpu --out bench-out $(BENCH_GPU_ARGS)

gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    --platform manylinux1_x86_64 -d .whl $(GPU_WHEELS)

reproduce-libero: $(STAMP)
	$(SF) reproduce-libero --libero-dir "$(LIBERO_DIR)" --vggt "$(VGGT)" --device "$(DEVICE)" --scheduler "$(SCHEDULER)" --out "$(OUT)" $(REPRO_ARGS)

clean:
	rm -rf $(VENV) demo-out bench-out out .whl
