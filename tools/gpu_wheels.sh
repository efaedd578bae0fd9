#!/usr/bin/env bash
# Downloads into .whl/ (repo root) the Python 3.12 x86-64 wheels that tools/gpu_check.sh
# installs on a GPU machine with no network: the packages its tests and bench import that
# such a machine's image (CUDA jax, flax, optax, orbax, torch, transformers, tokenizers,
# safetensors, huggingface-hub, pytest, ...) lacks. Our own package runs from the source tree.
#
#   bash tools/gpu_wheels.sh          # then carry .whl/ along with the working tree
#
# The list: fluxflow (the PyTorch reference networks) and what it imports that the image
# lacks (pydantic and its needs; typing-extensions because pydantic needs >= 4.16),
# lion-pytorch (the PyTorch flow step's optimizer), diffusers (the reference scheduler the
# sampling tests compare against) and braceexpand (imported by fluxflow_jax.data).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  fluxflow==0.8.1
  lion-pytorch==0.2.5
  diffusers==0.42.1
  braceexpand==0.1.7
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0
)

rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
ls -l .whl
du -sh .whl
