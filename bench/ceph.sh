#!/bin/bash
# Ceph benchmark (issue 20): bitbackd on an RBD image against
# qemu-storage-daemon on the same image (fio over NBD, four rows), and an
# incremental backup of an RBD disk against `rbd export-diff` of the same
# change.  Starts its own single-node Ceph cluster (needs root and the
# packages scripts/install-deps.sh installs).  bench/ceph.py's header says
# what each row runs and the targets.
#
# Usage: bench/ceph.sh [BUILD_DIR]        (default: build)
# Environment: CEPH_SIZE (image size, default 1G), CEPH_CHANGE (the
# incremental's change, default 256M), CEPH_RUNTIME (seconds per fio row,
# default 10), CEPH_ROUNDS (default 3), CEPH_SECTIONS ("fio backup", the
# default, or one of them), WORKDIR (default: a new folder under /tmp).
# This is a benchmark, not a test: it prints tables and never fails on speed.
set -euo pipefail

. "$(dirname "$0")/lib.sh"
bench_init ceph.sh "${1:-build}" fio qemu-storage-daemon qemu-img nbdcopy nbdkit rbd ceph-mon ceph-osd
bench_need_libnbd
W=${WORKDIR:-$(mktemp -d /tmp/bitback-ceph-bench.XXXXXX)}
mkdir -p "$W"
export BENCH_DIR=$W BENCH_BITBACK=$BITBACK BENCH_BITBACKD=$BITBACKD
"$PYTHON" "$here/bench/ceph.py"
rm -rf "$W"
