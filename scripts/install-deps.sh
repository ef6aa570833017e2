#!/usr/bin/env bash
# Install everything bitback needs to build and test, from Debian's apt.
# Idempotent: when every package is already installed it does nothing but check.
set -euo pipefail

PKGS=(
  build-essential pkg-config meson ninja-build
  libjson-c-dev libnbd-dev libssl-dev libxxhash-dev libzstd-dev libcmocka-dev zlib1g-dev
  libgnutls28-dev gnutls-bin libmicrohttpd-dev libsystemd-dev
  scdoc bash-completion
  python3-pytest python3-libnbd python3-prometheus-client curl
  qemu-utils qemu-system-common nbdkit libnbd-bin fio
  clang libclang-rt-14-dev
  ceph-mon ceph-osd ceph-common librbd-dev librados-dev radosgw qemu-block-extra
)

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "install-deps: installing ${missing[*]}" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
