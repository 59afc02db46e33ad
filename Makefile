# Entry points for building, testing and benchmarking fastalign. Everything runs in .venv.
#
#   make venv      create .venv (reusing a torch already installed system-wide) and the dev tools
#   make install   editable install; compiles fastalign._C when setup.py or csrc/ change
#   make test      the test suite, a line per test file (17 minutes measured on a quiet 2-core CPU
#                  from a fresh clone, 5 of them installing dependencies; 30 when the machine is
#                  busy; the two Triton compile-gate tests take 2.5 of the 12 minutes of tests)
#   make bench     the headline benchmarks (about 5 minutes on a quiet 2-core CPU): a line per row
#                  as it finishes, each row kept in build/bench/last-run.jsonl at once, then markdown
#                  tables and a chart in bench/results/<device>*. FULL=1 adds the hidden-states,
#                  distillation and training-step suites (about 75 minutes in all; the distillation
#                  suite's unfused and peer rows take 5 minutes each at 4096 tokens). BENCH_ARGS="-k fwd" narrows the
#                  set and FASTALIGN_BENCH_QUICK=1 shrinks the shapes; both write to build/bench/.
#                  A stopped run still gets its report, from the rows it finished.
#   make gpu-check the first thing to run on a new GPU: one script (about 8 minutes) that checks
#                  every op on the device against float64, runs the tests there, times the anchor
#                  workloads and writes bench/results/cuda-<gpu>.md. Needs only torch, triton and
#                  pytest (no venv, no install, no C++ build). DRY_RUN=1: on CPU, tiny shapes.
#   make gate      compile every Triton kernel variant for sm_80/90/100/120 and AMD gfx942/gfx90a,
#                  under this Triton and Triton 3.6; fails on spills (make test runs a fast subset)
#   make gpu-report the static performance model (no GPU): registers, spills, occupancy, load
#                  widths and instructions per element of every kernel and of TRL's and Liger's,
#                  bandwidth and issue floors on H100/H200 -> bench/results/static-<target>.md
#   make clean     build outputs (keeps .venv); `make distclean` drops .venv too

SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch's cpp_extension runs `ninja` from PATH and falls back to a slow serial build without it;
# the ninja pip installs lives in the venv, which is not on PATH unless activated.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

TORCH_SPEC := torch==2.13.0
# The setuptools a fresh Python 3.11 venv starts with (65.x) cannot build an editable install
# without `wheel`, and with it the editable install leaves kernels/ (package_dir-mapped to
# fastalign.kernels) unimportable.
# The verl integration is tested against verl itself: verl 0.9.1 pins transformers to
# >=5.5.3,<5.11,!=5.6.0 (TRL 1.16 takes any >=4.56.2), and its trainer modules, where
# compute_advantage lives, also import cachetools, uvicorn, fastapi and TransferQueue: members of
# its verl-core extra, whose others (nvtx, torchcodec, ...) the tests do not need.
# DeepSpeed runs ZeRO-3 on CPU (DS_ACCELERATOR=cpu, gloo) for the ZeRO-3 tests; it adds only einops
# and hjson, and leaves torch as it is.
# megatron-core holds the vocabulary-parallel cross-entropy behind verl's
# vocab_parallel_log_probs_from_logits, which the vocabulary-parallel tests compare with (on CPU,
# gloo); it needs only torch>=2.6, numpy and packaging, and leaves torch as it is (0.16.1 is its
# last release for Python 3.11).
# scipy and networkx (torch brings the latter) are the preference-data diagnostics' references.
DEV_DEPS := numpy scipy networkx triton pytest pytest-benchmark hypothesis ninja \
	'transformers>=5.5.3,<5.11,!=5.6.0' trl liger-kernel matplotlib \
	verl==0.9.1 cachetools uvicorn fastapi 'TransferQueue>=0.1.10' \
	'setuptools>=77' wheel deepspeed==0.19.8 megatron-core==0.16.1

# Stamps live inside .venv so that deleting the venv also forgets what was installed into it.
DEPS_STAMP := $(VENV)/.stamp-deps
INSTALL_STAMP := $(VENV)/.stamp-install
# Directories too: their mtime changes when a source file is added or removed.
BUILD_INPUTS := setup.py $(wildcard pyproject.toml setup.cfg) $(shell find csrc 2>/dev/null)

# Each row is appended here as it finishes (bench/conftest.py), so a stopped run loses nothing.
BENCH_ROWS := build/bench/last-run.jsonl
BENCH_ARGS ?=
# The headline set is what the README's main table and chart show; FULL=1 is every benchmark.
ifeq ($(FULL),1)
BENCH_SET :=
else
BENCH_SET := -m headline
endif
# A narrowed or quick run goes next to its row log, not over the results kept in the repository.
ifneq ($(strip $(BENCH_ARGS)),)
BENCH_OUT ?= build/bench
else ifeq ($(FASTALIGN_BENCH_QUICK),1)
BENCH_OUT ?= build/bench
else
BENCH_OUT ?= bench/results
endif

# The Triton a lent GPU machine has: the compile gate also runs under it (pip install --target, so
# it never replaces the venv's own triton).
OLD_TRITON_VERSION := 3.6.0
OLD_TRITON_DIR := build/triton-3.6
OLD_TRITON_STAMP := $(OLD_TRITON_DIR)/.stamp-$(OLD_TRITON_VERSION)
# gpu-check runs where nothing is installed: the venv's python when there is one, else the system's.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))

.PHONY: venv install test bench gate gpu-check gpu-report clean distclean

venv: $(DEPS_STAMP)

# Re-checked when the Makefile (and so the dependency list) changes. pip leaves requirements that
# are already satisfied alone, so a GPU machine's own torch and triton stay in place.
$(DEPS_STAMP): Makefile
	@test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	@$(PY) -c 'import torch' 2>/dev/null || $(PIP) install $(TORCH_SPEC)
	$(PIP) install -q $(DEV_DEPS)
	@touch $@

install: $(INSTALL_STAMP)

# Order-only on the deps: a dev-tool change must not force a 45 s rebuild of the extension.
$(INSTALL_STAMP): $(BUILD_INPUTS) | $(DEPS_STAMP)
	$(PIP) install --no-build-isolation -e .
	@touch $@

$(OLD_TRITON_STAMP): | $(DEPS_STAMP)
	rm -rf $(OLD_TRITON_DIR)
	$(PIP) install -q --no-deps --target $(OLD_TRITON_DIR) triton==$(OLD_TRITON_VERSION)
	@touch $@

test: install $(OLD_TRITON_STAMP)
	FASTALIGN_REQUIRE_OLD_TRITON=1 FASTALIGN_REQUIRE_PEERS=1 $(PY) -m pytest tests

gate: install $(OLD_TRITON_STAMP)
	$(PY) tests/ops/triton_compile_gate.py
	PYTHONPATH=$(OLD_TRITON_DIR) $(PY) tests/ops/triton_compile_gate.py

gpu-report: install
	$(PY) bench/static_report.py

gpu-check:
	FASTALIGN_DISABLE_NATIVE=1 $(GPU_PY) bench/gpu_check.py $(if $(filter 1,$(DRY_RUN)),--dry-run) $(GPU_CHECK_ARGS)

# The report runs even when a benchmark fails or the run is stopped (Ctrl-C, or SIGTERM, which
# the benchmarks treat as Ctrl-C): the shell notes the signal instead of dying with pytest, and
# the report is made from the rows finished so far. The exit status still says what happened.
bench: install
	@mkdir -p $(dir $(BENCH_ROWS)) && rm -f $(BENCH_ROWS)
	@status=0; trap 'status=130' INT TERM; \
	$(PY) -m pytest bench -q --benchmark-quiet $(BENCH_SET) $(BENCH_ARGS) --bench-rows=$(BENCH_ROWS) || status=$$?; \
	if [ -s $(BENCH_ROWS) ]; then $(PY) bench/report.py $(BENCH_ROWS) --out-dir $(BENCH_OUT) || status=1; \
	else echo "no benchmark rows written" >&2; [ $$status -ne 0 ] || status=1; fi; \
	exit $$status

clean:
	rm -rf build dist *.egg-info .pytest_cache .benchmarks fastalign/*.so $(INSTALL_STAMP)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
