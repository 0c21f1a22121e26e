#!/usr/bin/env bash
# The accelerator check (experiments/benchmarks/device_check.py): kernels against references on the
# device, the attention and int8 benchmarks, a 1B decoder's MFU; one markdown table. On a GPU or TPU it
# takes a few minutes; on a CPU it runs everything tiny, kernels interpreted (what CI does).
#   bash experiments/benchmarks/device_check.sh [--out device_check.md] [--tiny]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python3}" experiments/benchmarks/device_check.py "$@"
