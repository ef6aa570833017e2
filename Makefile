# Thin wrapper around meson + ninja.  The two set-up commands are
# `make demo` and `make check`; both install missing dependencies first.
#
#   make            build into build/ (installs nothing: run `make deps` once)
#   make deps       install missing dependencies (apt; check, demo and bench do it)
#   make check      unit tests (meson test) + integration tests (pytest)
#   make check SANITIZE=1   the same with ASan+UBSan, in build-san/
#   make demo       the end-to-end demo
#   make bench      the benchmarks in bench/ (slow; not part of check)
#   make fuzz       build the libFuzzer targets (clang) in build-fuzz/
#   make fuzz-run SECONDS=N   replay fuzz/crashes/, then fuzz each target
#                   N seconds (default 60) on a copy of fuzz/corpus/

SANITIZE ?=
ifeq ($(SANITIZE),1)
BUILD ?= build-san
MESON_OPTS = -Db_sanitize=address,undefined -Db_lundef=false -Dbuildtype=debug
export ASAN_OPTIONS = detect_leaks=1:abort_on_error=0:exitcode=86
export UBSAN_OPTIONS = halt_on_error=1:print_stacktrace=1:exitcode=87
else
BUILD ?= build
MESON_OPTS =
endif
PYTHON = /usr/bin/python3
PYTEST_ARGS ?=

.PHONY: all deps build check unit integration demo bench fuzz fuzz-run clean

all: build

deps:
	@scripts/install-deps.sh

$(BUILD)/build.ninja:
	meson setup $(BUILD) $(MESON_OPTS)

build: $(BUILD)/build.ninja
	ninja -C $(BUILD)

unit: build
	meson test -C $(BUILD) --print-errorlogs

# Test files go to a temporary folder that is removed when every test
# passed (and kept, with its name printed, when one failed): pytest's own
# default keeps the last three runs, which is tens of GiB here.
integration: build
	@tmp=$$(mktemp -d /tmp/bitback-pytest.XXXXXX) && \
	if BITBACK_BUILD=$(abspath $(BUILD)) $(PYTHON) -m pytest --basetemp=$$tmp -v -rfE $(PYTEST_ARGS) tests/integration; \
	then rm -rf $$tmp; else echo "test files kept in $$tmp" >&2; exit 1; fi

check: deps unit integration

demo: deps build
	BITBACK_BUILD=$(abspath $(BUILD)) scripts/demo.sh

bench: deps build
	bench/nbd.sh $(abspath $(BUILD))
	bench/backup.sh $(abspath $(BUILD))
	bench/chain.sh $(abspath $(BUILD))

# docs/fuzzing.md.  The fuzzing build is its own folder: every library in
# it carries libFuzzer's coverage instrumentation and the sanitizers.
FUZZ_BUILD = build-fuzz
SECONDS ?= 60

$(FUZZ_BUILD)/build.ninja:
	CC=clang meson setup $(FUZZ_BUILD) -Dfuzzing=true -Db_lundef=false

fuzz: $(FUZZ_BUILD)/build.ninja
	ninja -C $(FUZZ_BUILD)

fuzz-run: fuzz
	fuzz/run.sh $(FUZZ_BUILD) $(SECONDS)

clean:
	rm -rf build build-san build-fuzz
