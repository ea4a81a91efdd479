# ConvLens: the few targets people use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: demo test serve proto proto-check lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[server,dev,ray]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m convlens.server.demo --out out/demo

test: $(STAMP)
	$(PY) -m pytest -q

serve: $(STAMP)
	$(VENV)/bin/convlens serve

proto: $(STAMP)
	$(PY) tools/gen_proto.py

proto-check: $(STAMP)
	$(PY) tools/gen_proto.py --check

lint: $(STAMP)
	$(VENV)/bin/ruff check client server tests tools
	npx --yes @bufbuild/buf@1 lint proto

bench: $(STAMP)
	$(PY) -m convlens.server.bench --out docs/performance.md
	$(PY) -m convlens.server.bench_dream_style --out docs/performance.md
	$(PY) -m convlens.server.bench_maximize --out docs/performance.md

clean:
	rm -rf out build *.egg-info

# ---- reliability (#15): tools/reliability; figures in docs/reliability.md
.PHONY: fuzz soak
fuzz: $(STAMP)
	$(PY) -m tools.reliability.fuzz --calls $${FUZZ_CALLS:-10000}

soak: $(STAMP)
	$(PY) -m tools.reliability.soak --minutes $${SOAK_MINUTES:-30}
