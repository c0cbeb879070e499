VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo clean

install: $(STAMP)

# Re-installs only when setup.py changes; a fresh clone gets a fresh .venv.
$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,torch]"
	# taming's modules need only torch, numpy and einops; its declared deps would replace torch (see setup.py).
	$(PY) -m pip install --quiet --no-deps "taming-transformers-rom1504==0.0.6"
	# The page's test drives Debian's chromium (Playwright downloads no browser here); installing it needs root.
	command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# The whole pipeline on captioned_shapes: data, VQGAN, tokenizer + DalleBart, samples, judged report (runs/demo).
demo: install
	$(PY) -m dalle_jax.demo --root runs/demo

clean:
	rm -rf $(VENV) *.egg-info

# libtpu beside .venv (which it reuses through a .pth file), for `train.py --aot_topology` on machines without
# TPUs. Kept apart so CPU runs never load libtpu. Run AOT compiles with .venv-tpu/bin/python.
TPU_VENV := .venv-tpu
.PHONY: tpu-venv
tpu-venv: $(TPU_VENV)/.installed

$(TPU_VENV)/.installed: $(STAMP)
	test -x $(TPU_VENV)/bin/python || python3 -m venv $(TPU_VENV)
	$(PY) -c 'import sysconfig; print("import site; site.addsitedir(%r)" % sysconfig.get_paths()["purelib"])' \
		> "$$($(TPU_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/dalle_jax_main_venv.pth"
	$(TPU_VENV)/bin/python -m pip install --quiet "jax[tpu]==$$($(PY) -c 'import jax; print(jax.__version__)')"
	touch $@
