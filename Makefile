# Two commands do all set-up on a fresh machine:
#   make demo   - the main job: Redis (started locally if none is configured), a worker, streamed requests
#   make test   - the test suite (CPU; starts Redis if none answers)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Test processes (pytest-xdist; 0 runs the suite in this process). Many tests wait on worker processes and Redis
# (half a test's time, measured): four keep a 2-core machine busier than three, which left it idle a sixth of the
# time; each test still gets its own Redis keys, ports and directories. A file stays in one process (loadfile):
# some modules share a worker or an engine between their tests, in order. Files go out longest first
# (tests/conftest.py), not by test count.
PYTEST_WORKERS ?= 4

$(STAMP): pyproject.toml constraints.txt constraints-tested.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the version whose CPU wheel the machine's pip configuration offers (elsewhere set
	# PIP_EXTRA_INDEX_URL to PyTorch's CPU index, README): PyPI's own torch wheel pulls multi-GB CUDA libraries.
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -c constraints-tested.txt -e ".[dev]"
	@bash .ci/ensure-compiler
	touch $(STAMP)

.PHONY: install demo test redis bench lock
install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pagedserve demo

redis:
	@bash .ci/ensure-redis

# Bytecode is written even where the environment says not to (PYTHONDONTWRITEBYTECODE): the suite starts hundreds
# of processes (workers, the CLI), and each would otherwise compile the package from source again.
test: $(STAMP) redis
	$(PY) -m compileall -q pagedserve
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# Results go to .bench/ (ignored); the recorded runs in docs/ are only rewritten on purpose (--out docs/...).
bench: $(STAMP)
	$(VENV)/bin/pagedserve bench offline --out .bench/offline.json

# constraints-tested.txt anew: the newest releases pyproject.toml admits, resolved in a scratch venv
LOCK_VENV := .venv-lock
lock:
	rm -rf $(LOCK_VENV) && python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q -c constraints.txt torch==2.13.0
	$(LOCK_VENV)/bin/python -m pip install -q -c constraints.txt ".[dev]"
	{ sed -n '/^#/p' constraints-tested.txt; $(LOCK_VENV)/bin/python -m pip freeze --exclude pagedserve --exclude torch; } \
		> constraints-tested.txt.new && mv constraints-tested.txt.new constraints-tested.txt
	rm -rf $(LOCK_VENV)
