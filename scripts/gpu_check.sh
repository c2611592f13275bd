#!/usr/bin/env bash
# The course's GPU checks in one short run (budget: under 8 minutes on one H100), for a machine with a CUDA GPU:
#   bash scripts/gpu_check.sh [OUT_DIR]        # OUT_DIR (default gpu_check/) gets one log per check + summary.md
# CPU machines test the same code with Triton's interpreter; this runs what only a GPU can: the Triton kernels
# compiled for the device (forward + backward vs PyTorch SDPA, TFLOP/s), the CUDA C attention kernels, the
# attention benchmark, the tests marked `gpu`, bitsandbytes' GPU kernels, and the tiny capstone run (train -> eval ->
# quantize -> export) on CUDA. Each check has its own time
# limit; a failed check is recorded and the next one still runs. Exit status: the number of failed checks.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_check}
mkdir -p "$out"
py=${PYTHON:-python}
failed=0

if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA GPU visible to torch: nothing to check here (CPU paths are covered by pytest)"
  exit 0
fi

check() {  # check NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  if timeout "$limit" "$@" >"$out/$name.log" 2>&1; then status=ok; else status="FAILED ($?)"; failed=$((failed + 1)); fi
  printf '| %s | %s | %d s |\n' "$name" "$status" $((SECONDS - t0)) | tee -a "$out/summary.md"
}

{
  echo "# GPU check, $(date -u +%F)"
  echo
  "$py" -c "import torch; print(torch.cuda.get_device_name(), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  echo
  echo "| check | status | time |"
  echo "|---|---|---|"
} | tee "$out/summary.md"

check pytest_gpu 240 "$py" -m pytest -q -m gpu tests/test_04_cuda.py tests/test_04_flash_triton.py tests/test_04_sparse.py
check flash_triton 120 "$py" 04_efficient_attention/flash_triton.py --device cuda --dtype bfloat16
check cuda_attention 120 "$py" 04_efficient_attention/cuda_attention.py
check bench_attention 180 "$py" 04_efficient_attention/bench_attention.py --device cuda --dtype bfloat16 --max-n 8192 --no-plot
check bitsandbytes_gpu 120 "$py" 06_quantization/bnb.py --device cuda
check capstone_gpu 180 "$py" 10_capstone/minigpt.py all --config tiny --device cuda --runs-dir "$out/runs" --no-progress

echo "failed checks: $failed (logs in $out/)"
exit "$failed"
