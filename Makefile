# Two commands for a fresh clone: `make demo` and `make test` (both create .venv on first use).
# Tested with Python 3.11 (pyproject: requires-python >= 3.11); PYTHON=... picks another.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# pytest exits 5 when it collected no test (e.g. -k matched nothing): not a failure here.
PYTEST  = rc=0; $(PY) -m pytest -q $(1) || rc=$$?; \
          if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

.PHONY: demo test test-slow bench bench-quick clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,plot]'
	touch $(STAMP)

# The main job: what `tune_mode` does to resnet50 and what it saves, with the same command
# users run on their own models (convbn-fx report / convbn-fx measure).
demo: $(STAMP)
	$(VENV)/bin/convbn-fx report resnet50 --expect 53
	$(VENV)/bin/convbn-fx measure resnet50 --batch 4 --steps 3

# The default suite: representative and fast (the `slow` tests are deselected in pyproject).
test: $(STAMP)
	@$(call PYTEST,)

# The long sweeps only (model zoos, whole torchvision models): `pytest -m slow`.
test-slow: $(STAMP)
	@$(call PYTEST,-m slow)

bench: $(STAMP)
	$(PY) -m bench.modes

bench-quick: $(STAMP)
	$(PY) -m bench.modes --quick

clean:
	rm -rf $(VENV) $(VENV)-torch* build *.egg-info
