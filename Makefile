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

.PHONY: install test demo bench reproduce-libero clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,hub,tf,libero]"
	# the `openpi` extra without its numpy<2 pin (its image_tools needs only numpy and Pillow)
	$(PY) -m pip install -q --no-deps "openpi-client==0.1.2"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m sfcache.demo --out demo-out

bench: $(STAMP)
	$(PY) -m bench.run --out bench-out

reproduce-libero: $(STAMP)
	$(PY) -m sfcache.reproduce --libero-dir "$(LIBERO_DIR)" --vggt "$(VGGT)" --device "$(DEVICE)" --scheduler "$(SCHEDULER)" --out "$(OUT)" $(REPRO_ARGS)

clean:
	rm -rf $(VENV) demo-out bench-out out
