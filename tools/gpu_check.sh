#!/usr/bin/env bash
# The GPU path in one command, on a machine with a CUDA device and a CUDA build of torch:
#   tools/gpu_check.sh
# Makes .venv-gpu (seeing the machine's own torch through --system-site-packages, so no CUDA wheel
# is downloaded), installs ensemblekd into it without touching torch, and runs the tests marked
# `gpu` (NCCL all-reduce between Ray Train workers on the GPU, in fp32 and under bf16 autocast;
# two teachers labelling on one GPU at num_gpus 0.5 each, against the CPU's logits). Exits non-zero if there is no CUDA
# device: on such a machine the tests would only be skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device, or torch without CUDA')"
python3 -m venv --system-site-packages .venv-gpu
.venv-gpu/bin/pip install --quiet -e ".[test]"
.venv-gpu/bin/python -c "import torch; print('torch', torch.__version__, 'on', torch.cuda.get_device_name(0))"
exec .venv-gpu/bin/python -m pytest -m gpu -v -p no:cacheprovider tests
