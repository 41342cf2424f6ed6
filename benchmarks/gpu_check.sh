#!/usr/bin/env bash
# The GPU check, in one run on an H100/H200 (about 7-9 minutes): build the CUDA extension, print
# the ptxas resource report, run the GPU tests, compute-sanitizer memcheck over every op, then the
# kernel benchmarks, and end with a short table. Run from anywhere; writes into ${OUT:-benchmarks/out}.
#   ALPHAGRPO_CUDA_ARCHS (default 90a here: one arch builds fastest), MAX_JOBS (default: nproc).
#   QUICK=1 (about 3 minutes): build, GPU tests and BAGEL only; skips memcheck and the benchmarks.
# grpo_linear_token_loss is compared with Liger-Kernel's LigerFusedLinearGRPOLoss at 16 x 1,024
# tokens x H 3,584 x V 151,936 bf16 (BAGEL's head). The GPU box has no network: put a wheel at
# benchmarks/wheels/liger_kernel-*.whl (pip download liger-kernel --no-deps) to include it; without
# one the liger provider is skipped with a message. Targets: less peak memory, no slower than Liger.
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
build() { ALPHAGRPO_PTXAS_VERBOSE=1 $PY setup.py build_ext --inplace > "$OUT_DIR/build.log" 2>&1; }
if ! build; then
  # setup.py refuses an extension with its own static libstdc++ (the GPU machine's CXX=/opt/gcc/bin/g++
  # linked one in, and its error messages segfaulted): the system compiler links it dynamically
  grep -q "static copy of libstdc++" "$OUT_DIR/build.log" || { tail -40 "$OUT_DIR/build.log"; exit 1; }
  echo "CXX=${CXX:-c++} links libstdc++ statically: building with the system compiler (CC=gcc CXX=g++)"
  export CC=gcc CXX=g++
  build || { tail -40 "$OUT_DIR/build.log"; exit 1; }
fi
echo "built in $(( $(date +%s) - start )) s"
$PY -c "from alphagrpo_serve import kernels as K; i = K.build_info(); print(i); assert i['with_cuda'], i"
echo "== ptxas: kernels with spills (float64 instantiations excepted)"
grep -E "spill stores" "$OUT_DIR/build.log" | grep -v " 0 bytes spill stores" | sort | uniq -c || true

echo "== GPU tests"
# the kernels' GPU tests, then the product on cuda (tiny UMM served, updated and trained; the trainer
# package is imported from trainer/ when the project is not pip-installed there)
PYTHONPATH="$PWD:$PWD/trainer${PYTHONPATH:+:$PYTHONPATH}" \
  $PY -m pytest -q -m gpu tests/test_gpu.py tests/test_gpu_product.py 2>&1 | tee "$OUT_DIR/gpu_tests.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

if [ "${QUICK:-0}" = 1 ]; then
  echo "== QUICK=1: memcheck and kernel benchmarks skipped"
else
echo "== compute-sanitizer memcheck"
if command -v compute-sanitizer > /dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 9 $PY benchmarks/sanitize_ops.py > "$OUT_DIR/memcheck.log" 2>&1
  rc=$?; tail -3 "$OUT_DIR/memcheck.log"; [ $rc -eq 0 ] || status=1
else
  echo "compute-sanitizer not found"
fi

echo "== compute-sanitizer memcheck: grpo_linear_token_loss (chunks, in-place gradient, both ratio levels)"
if command -v compute-sanitizer > /dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 9 $PY -c "
import torch
from alphagrpo_serve import kernels as K
for dt in (torch.float32, torch.bfloat16):
    for level, chunk in (('token', 5), ('sequence', 3), ('sequence', 8)):
        h = torch.randn(2, 7, 64, device='cuda', dtype=dt, requires_grad=True)
        w = torch.randn(1000, 64, device='cuda', dtype=dt, requires_grad=True)
        b = torch.randn(1000, device='cuda', dtype=dt, requires_grad=True)
        t = torch.randint(0, 1000, (2, 7), device='cuda')
        out = K.grpo_linear_token_loss(h, w, t, torch.randn(2, device='cuda'), bias=b, ratio_level=level,
                                       old_logp=torch.full((2, 7), -7.0, device='cuda'), chunk_tokens=chunk)
        out.loss.backward()
torch.cuda.synchronize(); print('linear loss memcheck ok')
" > "$OUT_DIR/memcheck_linear.log" 2>&1
  rc=$?; tail -3 "$OUT_DIR/memcheck_linear.log"; [ $rc -eq 0 ] || status=1
fi

echo "== Liger-Kernel for the grpo_linear_token_loss comparison"
if $PY -c "import liger_kernel" 2> /dev/null; then
  echo "liger_kernel already importable"
else
  wheel=$(ls benchmarks/wheels/liger_kernel-*.whl 2> /dev/null | head -1)
  if [ -n "$wheel" ]; then
    # --no-deps: its dependencies (torch, triton) come with the CUDA torch already installed
    if $PY -m pip install --no-deps --no-index "$wheel" > "$OUT_DIR/liger_install.log" 2>&1; then
      echo "installed $wheel"
    else
      echo "could not install $wheel (see $OUT_DIR/liger_install.log): the liger provider is skipped"
    fi
  else
    echo "no benchmarks/wheels/liger_kernel-*.whl: the liger provider is skipped"
  fi
fi

echo "== kernel benchmarks"
$PY benchmarks/kernels.py --device cuda --repeats 20 --slow-repeats 10 --json "$OUT_DIR/kernels-cuda.json" \
  --results "$OUT_DIR/RESULTS-gpu.md" > "$OUT_DIR/kernels.log" 2>&1 || status=1
grep -E "^\| " "$OUT_DIR/kernels.log" | grep -E "ours|^\| op" | head -40
echo "== grpo_linear_token_loss at 16 x 1,024 x 3,584 x 151,936 bf16, every provider (target: ours below liger in"
echo "   peak extra MiB, and ms <= liger's)"
grep -E "liger provider skipped" "$OUT_DIR/kernels.log" || true
grep -E "^\| grpo_linear_token_loss" "$OUT_DIR/kernels.log" || echo "no grpo_linear_token_loss rows (see $OUT_DIR/kernels.log)"
fi
echo "== BAGEL on cuda: tiny checkpoint served in bf16 (Generate, Reflect, UpdateWeights) + one train step"
bash benchmarks/gpu_bagel.sh 2>&1 | tee "$OUT_DIR/gpu_bagel.log" | tail -8; [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "== summary: tests $(tail -1 "$OUT_DIR/gpu_tests.log"); exit status $status"
exit $status
