#!/usr/bin/env bash
# Run every libFuzzer target of fuzz/ (docs/fuzzing.md); `make fuzz-run`.
#   fuzz/run.sh BUILD_DIR SECONDS [TARGET...]
# For each target (default: every folder of fuzz/corpus/):
#   1. replay every saved input of fuzz/crashes/TARGET/ (not README): any
#      crash, leak, sanitizer report or timeout fails the run;
#   2. fuzz for SECONDS on a temporary copy of fuzz/corpus/TARGET/ (the
#      tree's corpus is never modified), -timeout=10 -rss_limit_mb=2048.
#      FUZZ_TIMEOUT=S raises the per-input timeout: libFuzzer measures it in
#      wall-clock time, so long runs that share the cores with other work
#      need more than CI's 10 s to avoid reporting a starved input as slow.
#      A crash fails the run; the input is kept under
#      BUILD_DIR/fuzz-artifacts/TARGET/ and its path printed.
# The log of each run is BUILD_DIR/fuzz-logs/TARGET.log; the last line
# printed per target is libFuzzer's final "DONE" line (executions, cov).
set -euo pipefail
src=$(cd "$(dirname "$0")" && pwd)
build=$(cd "${1:?usage: fuzz/run.sh BUILD_DIR SECONDS [TARGET...]}" && pwd)
seconds=${2:?usage: fuzz/run.sh BUILD_DIR SECONDS [TARGET...]}
shift 2
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    for d in "$src"/corpus/*/; do targets+=("$(basename "$d")"); done
fi
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
common=(-timeout="${FUZZ_TIMEOUT:-10}" -rss_limit_mb=2048)
mkdir -p "$build/fuzz-logs"
work=$(mktemp -d "${TMPDIR:-/tmp}/bitback-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT
failed=0
for t in "${targets[@]}"; do
    exe=$build/fuzz/$t
    if [ ! -x "$exe" ]; then
        echo "fuzz-run: $exe is missing (run 'make fuzz')" >&2
        exit 1
    fi
    log=$build/fuzz-logs/$t.log
    mapfile -t saved < <(find "$src/crashes/$t" -type f ! -name README 2>/dev/null | sort)
    if [ ${#saved[@]} -gt 0 ]; then
        if ! "$exe" "${common[@]}" "${saved[@]}" >"$log.replay" 2>&1; then
            echo "fuzz-run: $t: a saved input of fuzz/crashes/$t fails; log: $log.replay" >&2
            failed=1
            continue
        fi
        echo "fuzz-run: $t: replayed ${#saved[@]} saved input(s)"
    fi
    artifacts=$build/fuzz-artifacts/$t
    mkdir -p "$artifacts" "$work/$t"
    cp -R "$src/corpus/$t/." "$work/$t/"
    if "$exe" "${common[@]}" -max_total_time="$seconds" -print_final_stats=1 \
            -artifact_prefix="$artifacts/" "$work/$t" >"$log" 2>&1; then
        echo "fuzz-run: $t: $(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1)"
    else
        echo "fuzz-run: $t FAILED; log: $log" >&2
        for a in "$artifacts"/*; do
            [ -e "$a" ] && echo "fuzz-run: $t: input kept in $a" >&2
        done
        failed=1
    fi
    rm -rf "${work:?}/$t"
done
exit $failed
