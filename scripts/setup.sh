#!/usr/bin/env bash
# Set up tesla_func on a fresh machine: the Fashion-MNIST Debian package, the CPU build of
# torch 2.13.0 (installed first: a bare torch requirement would pull several GB of CUDA wheels),
# then the project with its dev extra. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
python3 -m pip install -q --disable-pip-version-check "torch==2.13.0"
python3 -m pip install -q --disable-pip-version-check -e ".[dev]"
