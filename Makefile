# ConvLens: the few targets people use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: demo gallery test serve proto proto-check lint bench clean node-deps

# The ONNX runtime: the `gpu` extra (onnxruntime-gpu) where nvidia-smi answers, else the `cpu` extra
# (onnxruntime). The server extra holds neither, so a reinstall never brings one back over the other: both
# ship the `onnxruntime` module folder, and removing either deletes the files they share. When the other one
# is there (a past install, a GPU added or gone), both are removed and the chosen one installed clean.
ORT_EXTRA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
ORT_OTHER := $(if $(filter gpu,$(ORT_EXTRA)),onnxruntime,onnxruntime-gpu)

$(STAMP): pyproject.toml
	test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	if $(PIP) show $(ORT_OTHER) >/dev/null 2>&1; then $(PIP) uninstall -q -y onnxruntime onnxruntime-gpu; fi
	$(PIP) install -q -e '.[server,$(ORT_EXTRA),dev,ray]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m tools.demo --out out/demo

gallery: $(STAMP)
	$(PY) -m tools.demo --gallery --out out/gallery

test: $(STAMP) node-deps chromium
	$(PY) -m pytest -q

# The Node.js contract test's client (tests/contract_node): @grpc/grpc-js and @grpc/proto-loader, pinned by
# package-lock.json. Installs Node (20+) with apt when it is missing (CI runs as root on Debian).
NODE_DEPS := tests/contract_node/node_modules/.package-lock.json
node-deps: $(NODE_DEPS)
$(NODE_DEPS): tests/contract_node/package.json tests/contract_node/package-lock.json
	command -v node >/dev/null && command -v npm >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq nodejs npm)
	cd tests/contract_node && npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_DEPS)

serve: $(STAMP)
	$(VENV)/bin/convlens serve

proto: $(STAMP)
	$(PY) tools/gen_proto.py

proto-check: $(STAMP)
	$(PY) tools/gen_proto.py --check

lint: $(STAMP)
	$(VENV)/bin/ruff check client server tests tools
	$(PY) -m mypy --strict client/convlens/client
	$(PY) -m mypy --strict server/convlens/server/engine
	npx --yes @bufbuild/buf@1 lint proto

bench: $(STAMP)
	$(PY) -m tools.bench.saliency --out docs/performance.md
	$(PY) -m tools.bench.dream_style --out docs/performance.md
	$(PY) -m tools.bench.maximize --out docs/performance.md

clean:
	rm -rf out build *.egg-info

# Issue 18: ConvLens against a plain grpc.aio server and Ray Serve on the same work (tools/peers/);
# prints the tables, writes out/bench/peers.json. Not part of `make test`.
.PHONY: bench-peers
bench-peers: $(STAMP)
	$(PY) -m tools.peers.bench

# ---- reliability (#15): tools/reliability; figures in docs/reliability.md
.PHONY: fuzz soak
fuzz: $(STAMP)
	$(PY) -m tools.reliability.fuzz --calls $${FUZZ_CALLS:-10000}

soak: $(STAMP)
	$(PY) -m tools.reliability.soak --minutes $${SOAK_MINUTES:-30}

# Cancellation storm, slow and vanished stream readers (#15, tools/reliability/storm.py)
.PHONY: storm
storm: $(STAMP)
	$(PY) -m tools.reliability.storm

# Issue 16: the unit atlas. `make atlas` builds a small one of the embedded Lite0 (4 channels of three
# layers) in out/atlas/ and screenshots a unit page; `make chromium` (run by `make test`) installs Debian's
# chromium for the atlas browser test: as root through apt-get, else it says so and that test is skipped.
.PHONY: atlas chromium
atlas: $(STAMP) chromium
	$(PY) -m tools.atlas.demo --out out/atlas --screenshot out/atlas/unit.png

chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }; }; } || \
	  echo "chromium: Debian's package could not be installed here (needs root and apt); the atlas browser test will be skipped"
