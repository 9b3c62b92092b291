#!/usr/bin/env bash
# The GPU check: on one CUDA machine, in under 8 minutes, the CUDA paths of adaptflow and their speed.
#
#   make gpu-wheels                      # here, once: the packages a bare GPU image lacks, into .whl/
#   benchmarks/gpu_check.sh              # there: python3 with torch (CUDA), torchvision, timm, pyarrow,
#                                        # pandas, scikit-learn, pillow, pyyaml, safetensors, pytest
#
# 1. the CUDA tests (tests/test_gpu.py: bf16 extraction against fp32 on the CPU, end-to-end steps);
# 2. extraction throughput, resnet50 and efficientnet_lite0 at 224 px, decoding on CPU workers, then on
#    the device (benchmarks/extraction.py);
# 3. one end-to-end DANN candidate at 224 px for a fixed 300 steps: steps/s and accuracies
#    (benchmarks/adaptation.py on the demo shift);
# 4. sharded images-mode prediction against extraction, images/s (benchmarks/prediction.py).
# Everything it prints is also written to $OUT/gpu_check.log when OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${OUT:-/tmp}/gpu_check.log
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 DO_NOT_TRACK=1
step() { echo; echo "== $* ($(date +%T))"; }
{
    step "device"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    $PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.is_available())"

    step "1. CUDA tests"
    timeout 120 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider || echo "CUDA tests FAILED"

    step "2. extraction, decode on CPU workers"
    timeout 150 $PY benchmarks/extraction.py --backbone resnet50 --backbone efficientnet_lite0 --weights random \
        --images 4096 --num-workers 8 --device cuda --decode-on workers --per-image 64 || echo "extraction FAILED"
    step "2b. extraction, decode on the device"
    timeout 120 $PY benchmarks/extraction.py --backbone resnet50 --backbone efficientnet_lite0 --weights random \
        --images 4096 --num-workers 8 --device cuda --decode-on device --per-image 64 || echo "extraction FAILED"

    step "3. one end-to-end DANN candidate, 224 px, 300 steps"
    timeout 120 $PY benchmarks/adaptation.py --methods dann --modes images --image-size 224 --steps 300 \
        --max-per-domain 1000 --device cuda --workers 8 || echo "adaptation FAILED"

    step "4. sharded images-mode prediction against extraction, 224 px"
    timeout 90 $PY benchmarks/prediction.py --images 4096 --image-size 224 --device cuda || echo "prediction FAILED"
    step "done"
} 2>&1 | tee "$LOG"
