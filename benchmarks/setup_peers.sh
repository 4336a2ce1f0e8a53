#!/usr/bin/env bash
# Builds the virtual environments of the libraries linops is compared with.
#
#   benchmarks/.envs/cola   cola-ml (CoLA). Alone, because its plum fork (cola-plum-dispatch)
#                           installs the same `plum` package as plum-dispatch, which linops uses.
#   benchmarks/.envs/peers  curvlinops-for-pytorch, PyHessian and BackPACK.
#
# Every install runs under a constraints file that pins torch==2.13.0, the CPU build this
# repository develops against, so pip never pulls a CUDA torch. BackPACK is installed with
# --no-deps plus the packages it imports (einops, unfoldNd): its declared torchvision
# dependency is only used by backpack/utils/examples.py and has no CPU build matching torch
# 2.13 here. curvlinops is installed with --no-deps for the same reason, plus its own list.
#
# Usage: bash benchmarks/setup_peers.sh [cola|peers]...   (default: both)
# Environment: PYTHON (default python3), ENVS (default benchmarks/.envs).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
ENVS="${ENVS:-$HERE/.envs}"
TORCH_PIN="torch==2.13.0"

mkdir -p "$ENVS"
CONSTRAINTS="$ENVS/constraints.txt"
printf '%s\n' "$TORCH_PIN" > "$CONSTRAINTS"

make_venv() {
    local dir="$1"
    if [ ! -x "$dir/bin/python" ]; then
        "$PYTHON" -m venv "$dir"
    fi
    "$dir/bin/python" -m pip install -q --upgrade pip -c "$CONSTRAINTS"
    "$dir/bin/python" -m pip install -q -c "$CONSTRAINTS" "$TORCH_PIN" numpy scipy
}

setup_cola() {
    local dir="$ENVS/cola"
    echo "== $dir"
    make_venv "$dir"
    printf '%s\nbeartype<0.23\n' "$TORCH_PIN" > "$ENVS/constraints-cola.txt"
    "$dir/bin/python" -m pip install -q -c "$ENVS/constraints-cola.txt" cola-ml "beartype<0.23"
    "$dir/bin/python" - <<'EOF'
import importlib.metadata as md

import cola
import torch

print("cola-ml", md.version("cola-ml"), "| cola-plum-dispatch", md.version("cola-plum-dispatch"),
      "| beartype", md.version("beartype"), "| torch", torch.__version__)
assert torch.__version__.startswith("2.13.0"), torch.__version__
EOF
}

setup_peers() {
    local dir="$ENVS/peers"
    echo "== $dir"
    make_venv "$dir"
    # BackPACK: its own code imports einops and unfoldNd; torchvision only in utils/examples.py.
    "$dir/bin/python" -m pip install -q -c "$CONSTRAINTS" --no-deps backpack-for-pytorch
    "$dir/bin/python" -m pip install -q -c "$CONSTRAINTS" einops unfoldNd
    # curvlinops: its declared dependencies minus backpack's torchvision. pip then reports
    # "backpack-for-pytorch requires torchvision, which is not installed": expected, harmless.
    "$dir/bin/python" -m pip install -q -c "$CONSTRAINTS" --no-deps curvlinops-for-pytorch
    "$dir/bin/python" -m pip install -q -c "$CONSTRAINTS" \
        tqdm einconv linear_operator opt-einsum
    "$dir/bin/python" -m pip install -q -c "$CONSTRAINTS" pyhessian
    "$dir/bin/python" - <<'EOF'
import importlib.metadata as md

import backpack
import curvlinops
import pyhessian
import torch

versions = {name: md.version(name) for name in (
    "curvlinops-for-pytorch", "PyHessian", "backpack-for-pytorch", "torch")}
print(" | ".join(f"{k} {v}" for k, v in versions.items()))
assert torch.__version__.startswith("2.13.0"), torch.__version__
EOF
}

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(cola peers)
fi
for target in "${targets[@]}"; do
    case "$target" in
        cola) setup_cola ;;
        peers) setup_peers ;;
        *) echo "unknown target '$target': use cola or peers" >&2; exit 2 ;;
    esac
done
echo "done: environments in $ENVS"
