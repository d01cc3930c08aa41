#!/usr/bin/env bash
# The GPU checks of the fused attention (issue 6) as one prepared run, for a session lent a CUDA machine:
#
#   bash benchmarks/gpu_session.sh            # logs under $OUT (the device tool's folder) or ./gpu_out
#
# 1. the kernel tests on the compiled kernels and GPU tensors (tests/test_kernels.py with TRITON_INTERPRET=0;
#    the same float64 / SDPA comparisons the CPU interpreter runs in CI);
# 2. benchmarks/bench_attention.py: kernel vs every SDPA backend (and flash-attn if present) on the ViCA2-7B
#    shapes, with a full-size error check against SDPA, then the Hiera blocks (attention part and whole block).
# It uses the machine's own torch / triton / transformers (no installs: the CUDA machines are offline) and makes
# this checkout importable as the `vica2` package through a link. Each step has a timeout, so the whole run fits
# one 10-minute device call (9.5 minutes at most; much of it Triton compiling each kernel variant once). Paste
# bench_attention.md into benchmarks/RESULTS.md.
#
#   STEPS=generate bash benchmarks/gpu_session.sh   # a second call, if device time is left: the ViCA2-7B
#                                                   # generation row (bench_generate.py --sizes 7b, <= 7 minutes)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
site=$(mktemp -d)
ln -s "$PWD" "$site/vica2"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
python=${PYTHON:-python3}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$python" -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', \
triton.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())"
} 2>&1 | tee "$out/machine.txt"

status=0
steps=${STEPS:-tests bench}  # STEPS="generate" for a second call: the ViCA2-7B generation row of RESULTS.md

if [[ " $steps " == *" tests "* ]]; then
    echo "== kernel tests on the GPU"
    # Most of their time is Triton compiling each test's kernel variants: spread them over workers where xdist is.
    workers=$("$python" -c "import xdist" 2>/dev/null && echo "-n 8")
    timeout 240 "$python" -m pytest tests/test_kernels.py -q -p no:cacheprovider -rs $workers 2>&1 \
        | tee "$out/test_kernels.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if [[ " $steps " == *" bench "* ]]; then
    echo "== attention benchmark"
    timeout 320 "$python" benchmarks/bench_attention.py --frames "${FRAMES:-32}" 2>&1 | tee "$out/bench_attention.md"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if [[ " $steps " == *" generate "* ]]; then
    echo "== ViCA2-7B generation (random bf16 weights)"
    timeout 420 "$python" benchmarks/bench_generate.py --sizes 7b 2>&1 | tee "$out/bench_generate.md"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
exit $status
