#!/usr/bin/env bash
# The one command to run on a lent GPU machine (no network), from the repository root
# with the wheel folder .whl/ carried along (benchmarks/build_gpu_wheels.py builds it):
#   bash benchmarks/gpu_check.sh [gpu_check.py options]
# Installs the wheels the machine lacks into /tmp/site, puts them and the repository on
# PYTHONPATH, and runs benchmarks/gpu_check.py, which writes $OUT/gpu_check.json and
# $OUT/gpu_check.log (OUT defaults to outputs/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/outputs/gpu_check}
SITE=${GPU_CHECK_SITE:-/tmp/site}
mkdir -p "$OUT"
export OUT
{
    echo "gpu_check.sh $(date -Is) on $(hostname): python3 = $(command -v python3) ($(python3 --version 2>&1))"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "no wheels in .whl/: build them with benchmarks/build_gpu_wheels.py and carry .whl along"
    elif ! python3 -m pip install --no-index --no-deps --upgrade --target "$SITE" .whl/*.whl; then
        # Without pip, a wheel of pure Python is a zip archive to unpack.
        echo "pip install failed; unpacking the wheels into $SITE instead"
        for wheel in .whl/*.whl; do python3 -m zipfile -e "$wheel" "$SITE"; done
    fi
} 2>&1 | tee -a "$OUT/gpu_check.log"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python3 benchmarks/gpu_check.py --out "$OUT" "$@"
