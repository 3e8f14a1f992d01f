#!/usr/bin/env bash
# Fresh-machine setup: Debian's Fashion-MNIST files, TCMalloc and a virtualenv at .venv with the
# requirements. Idempotent; safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
# TCMalloc: launch.py and the benchmarks preload it (trainer/allocator.py says why)
PACKAGES="dataset-fashion-mnist libtcmalloc-minimal4"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] \
    || ! /sbin/ldconfig -p | grep libtcmalloc_minimal.so.4 >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get install -y -q $PACKAGES >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q $PACKAGES >/dev/null; }
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-test.txt
