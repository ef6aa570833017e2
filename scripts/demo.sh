#!/usr/bin/env bash
# `make demo`: the project's main job end to end.
#  1. the offline flow: a raw disk wrapped in QBM gets a persistent dirty
#     bitmap, writes mark it, and the map shows what an incremental copies;
#  2. the daemon flow: bitbackd serves the disk over NBD, tracks a writer's
#     writes live, and keeps the bitmap across a restart;
#  3. live backups: a full and an incremental backup taken while a writer
#     runs, each verified with qemu-img compare.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/demo-chain.sh"; echo
"$here/demo-offline.sh"
if [ -x "$here/demo-daemon.sh" ]; then
  echo
  "$here/demo-daemon.sh"
fi
echo
"$here/demo-backup.sh"
