VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo clean

install: $(STAMP)

# Re-installs only when setup.py changes; a fresh clone gets a fresh .venv.
$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

# The whole pipeline on captioned_shapes: data, VQGAN, tokenizer + DalleBart, samples, judged report (runs/demo).
demo: install
	$(PY) -m dalle_jax.demo --root runs/demo

clean:
	rm -rf $(VENV) *.egg-info
