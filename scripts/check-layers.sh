#!/bin/sh
# Check that no source file includes a header of a higher layer
# (docs/DESIGN.md, "Layers").  Usage: check-layers.sh [SRC_DIR]
#    or: check-layers.sh --roots OUT_DIR SRC_DIR
#
# With --roots it makes the per-layer include roots the build compiles
# with (meson.build): OUT_DIR/LAYER/ holds a link to SRC_DIR/X for every
# layer X that LAYER may use, and nothing else, so an upward #include does
# not compile.  The table below is the one source of both.
#
# Every folder directly under src/ is a layer.  For each file under it
# (.c and .h, at any depth), every `#include "LAYER/..."` must name a layer
# that the table below allows it to use.  A folder missing from the table
# is an error too, so a new layer must be placed in it.  Exit status: 0
# when every include is allowed, 1 otherwise (each offending line is
# printed as FILE:LINE: ...).
set -u
src=${1:-$(dirname "$0")/../src}

# may_use LAYER: the layers that LAYER's files may include, itself first.
may_use() {
    case $1 in
    util)   echo "util" ;;
    crypto) echo "crypto util" ;;
    bitmap) echo "bitmap util" ;;
    block)  echo "block bitmap crypto util" ;;
    repo)   echo "repo block bitmap crypto util" ;;
    job)    echo "job block bitmap crypto util" ;;
    nbd)    echo "nbd block bitmap crypto util" ;;
    qmp)    echo "qmp job nbd block bitmap crypto util" ;;
    daemon) echo "daemon qmp job nbd repo block bitmap crypto util" ;;
    client) echo "client crypto util" ;;
    cli)    echo "cli client repo nbd block bitmap crypto util" ;;   # nbd: serve
    *)      return 1 ;;
    esac
}

if [ "${1:-}" = --roots ]; then
    out=$2 src=$3
    for dir in "$src"/*/; do
        layer=$(basename "$dir")
        allowed=$(may_use "$layer") || {
            echo "check-layers: src/$layer is not in the layer table of $0" >&2
            exit 1
        }
        rm -rf "$out/$layer"
        mkdir -p "$out/$layer" || exit 1
        for used in $allowed; do
            ln -s "$src/$used" "$out/$layer/$used" || exit 1
        done
    done
    exit 0
fi

status=0
for dir in "$src"/*/; do
    layer=$(basename "$dir")
    if ! allowed=$(may_use "$layer"); then
        echo "check-layers: src/$layer is not in the layer table of $0" >&2
        status=1
        continue
    fi
    # FILE:LINE:#include "X/...", for every quoted include with a folder.
    hits=$(find "$dir" -name '*.[ch]' -exec grep -Hn \
               '^[[:space:]]*#[[:space:]]*include[[:space:]]*"[^"/]*/' {} +)
    [ -n "$hits" ] || continue
    bad=$(printf '%s\n' "$hits" | while IFS= read -r hit; do
        used=$(printf '%s\n' "$hit" | sed 's/^[^"]*"\([^"/]*\)\/.*/\1/')
        case " $allowed " in
        *" $used "*) ;;
        *) printf '%s: %s may not include %s/\n' "$hit" "$layer" "$used" ;;
        esac
    done)
    if [ -n "$bad" ]; then
        printf '%s\n' "$bad" >&2
        status=1
    fi
done
exit $status
