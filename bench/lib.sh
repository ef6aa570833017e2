# Shared by the benchmarks (sourced, not run): the build to measure, the
# tools they need, and the Python path of their drivers.

# bench_init NAME BUILD_DIR TOOL...: set here (the checkout), build
# (BUILD_DIR, default build, relative to the checkout), BITBACK, BITBACKD,
# PYTHON and PYTHONPATH (tests/lib for bitback_testlib: Daemon, QMP client,
# qmpcli; bench/ for benchlib.py); export BENCH_NAME=NAME (the prefix of
# error messages, in benchlib too); fail unless every TOOL is installed and
# bitback and bitbackd are built.
bench_init() {
    BENCH_NAME=$1
    export BENCH_NAME
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    build=$(bench_build_dir "${2:-build}")
    BITBACK=$build/bitback
    BITBACKD=$build/bitbackd
    PYTHON=/usr/bin/python3
    export PYTHONPATH=$here/tests/lib:$here/bench${PYTHONPATH:+:$PYTHONPATH}
    local tool
    for tool in "${@:3}"; do
        command -v "$tool" >/dev/null || { echo "$BENCH_NAME: $tool is not installed" >&2; exit 1; }
    done
    bench_need_bins "$BITBACK" "$BITBACKD"
}

# bench_build_dir DIR: DIR made absolute (relative to the checkout)
bench_build_dir() {
    case $1 in /*) echo "$1" ;; *) echo "$here/$1" ;; esac
}

# bench_need_bins BIN...: fail unless every BIN is built
bench_need_bins() {
    local bin
    for bin in "$@"; do
        [ -x "$bin" ] || { echo "$BENCH_NAME: $bin not built (run ninja -C ${bin%/*})" >&2; exit 1; }
    done
}

# bench_need_libnbd: fail unless $PYTHON has the libnbd bindings
bench_need_libnbd() {
    "$PYTHON" -c 'import nbd' 2>/dev/null || { echo "$BENCH_NAME: python3-libnbd is missing" >&2; exit 1; }
}
