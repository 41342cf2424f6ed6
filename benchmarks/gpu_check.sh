#!/usr/bin/env bash
# The GPU check, in one run on an H100/H200 (about 5-7 minutes): build the CUDA extension, print
# the ptxas resource report, run the GPU tests, compute-sanitizer memcheck over every op, then the
# kernel benchmarks, and end with a short table. Run from anywhere; writes into ${OUT:-benchmarks/out}.
#   ALPHAGRPO_CUDA_ARCHS (default 90a here: one arch builds fastest), MAX_JOBS (default: nproc).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-benchmarks/out}
mkdir -p "$OUT_DIR"
export ALPHAGRPO_CUDA_ARCHS=${ALPHAGRPO_CUDA_ARCHS:-90a}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0

echo "== build ($($PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'), $(nvcc --version | tail -1))"
start=$(date +%s)
ALPHAGRPO_PTXAS_VERBOSE=1 $PY setup.py build_ext --inplace > "$OUT_DIR/build.log" 2>&1 || { tail -40 "$OUT_DIR/build.log"; exit 1; }
echo "built in $(( $(date +%s) - start )) s"
$PY -c "from alphagrpo_serve import kernels as K; i = K.build_info(); print(i); assert i['with_cuda'], i"
echo "== ptxas: kernels with spills (float64 instantiations excepted)"
grep -E "spill stores" "$OUT_DIR/build.log" | grep -v " 0 bytes spill stores" | sort | uniq -c || true

echo "== GPU tests"
$PY -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$OUT_DIR/gpu_tests.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== compute-sanitizer memcheck"
if command -v compute-sanitizer > /dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 9 $PY benchmarks/sanitize_ops.py > "$OUT_DIR/memcheck.log" 2>&1
  rc=$?; tail -3 "$OUT_DIR/memcheck.log"; [ $rc -eq 0 ] || status=1
else
  echo "compute-sanitizer not found"
fi

echo "== kernel benchmarks"
$PY benchmarks/kernels.py --device cuda --repeats 20 --json "$OUT_DIR/kernels-cuda.json" \
  --results "$OUT_DIR/RESULTS-gpu.md" > "$OUT_DIR/kernels.log" 2>&1 || status=1
grep -E "^\| " "$OUT_DIR/kernels.log" | grep -E "ours|^\| op" | head -40
echo "== summary: tests $(tail -1 "$OUT_DIR/gpu_tests.log"); exit status $status"
exit $status
