#!/usr/bin/env bash
# README main job: installs everything, trains the default config on Fashion-MNIST,
# then prints the per-level table (and writes JSON + plot) for the trained network.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
WORKDIR=${WORKDIR:-runs/lenet3c1l_fmnist}
.venv/bin/python train.py --config configs/lenet3c1l_fashion_mnist.py --workdir "$WORKDIR" "$@"
.venv/bin/python evaluate.py --workdir "$WORKDIR" --json "$WORKDIR/levels.json" --plot "$WORKDIR/levels.png"
