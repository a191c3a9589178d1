#!/usr/bin/env bash
# One prepared GPU session (device time is scarce): the deit_small-shaped W3/A3 full pipeline timed
# alone, then CUDA tests and the reconstruction methods on the embedded ViT at paper settings
# (1024 calibration images, 1000 iterations; 200 at W6/A6) in three streams sharing the GPU.
# Everything lands in $OUT/results.tgz (+ session.log), also when a phase hits its time cap.
#
#   OUT=runs/gpu bash benchmarks/run_on_gpu.sh      # ~9 minutes on one H100 (+ about 4 for the bf16 + compile run)
#   DEVICE=cpu DEIT_ARGS=--smoke ACC_ARGS="--iters 2 --calib 64 --test 200" bash benchmarks/run_on_gpu.sh  # dry run
# The 2025 methods (issue #17): deit_small-shaped W3/A3 at one matched budget (1000 steps) per method, then the
# embedded-ViT cells at each method's own settings (20,000 steps: expect the time cap to stop the later cells):
#   DEIT_METHODS="isvit isvit+ aphq-vit fima-q" STREAM_METHODS="aphq-vit fima-q isvit+" DEIT_CAP=120 TOTAL_CAP=540 \
#     OUT=runs/gpu2025 bash benchmarks/run_on_gpu.sh
#   DEVICE=cpu DEIT_ARGS=--smoke ACC_ARGS="--iters 5 --calib 64 --test 200" DEIT_METHODS="aphq-vit fima-q" \
#     STREAM_METHODS="aphq-vit fima-q" bash benchmarks/run_on_gpu.sh   # its dry run
set -u
OUT=${OUT:-runs/gpu}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
DEIT_CAP=${DEIT_CAP:-330}   # seconds for each deit_small run
DEIT_METHODS=${DEIT_METHODS:-isvit}
STREAM_METHODS=${STREAM_METHODS:-isvit qdrop isvit-official}
TOTAL_CAP=${TOTAL_CAP:-530} # seconds from start until everything is packed
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
WORK=$(mktemp -d)
T0=$(date +%s)
elapsed() { echo $(($(date +%s) - T0)); }
mkdir -p "$OUT"
exec > >(tee "$OUT/session.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))"

for m in $DEIT_METHODS; do
  echo "== deit_small W3/A3 full pipeline, $m (alone on the device)"
  timeout "$DEIT_CAP" $PY -m benchmarks.gpu --device "$DEVICE" --method "$m" --out "$WORK/deit_$m" ${DEIT_ARGS:-} \
    || echo "deit run $m stopped (rc $?)"
done
# the speed issue's GPU fast path: the same run with bf16 matmuls and compiled steps (FAST_VARIANTS="" skips it)
for v in ${FAST_VARIANTS-bf16_compile}; do
  echo "== deit_small W3/A3 full pipeline, isvit, $v"
  flags="--matmul-dtype bfloat16"; [ "$v" = bf16_compile ] && flags="$flags --compile"
  timeout "$DEIT_CAP" $PY -m benchmarks.gpu --device "$DEVICE" --method isvit $flags --out "$WORK/deit_isvit_$v" ${DEIT_ARGS:-} \
    || echo "deit run isvit $v stopped (rc $?)"
done

echo "== CUDA tests + embedded ViT table ($((TOTAL_CAP - $(elapsed))) s left)"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$WORK/test_cuda.log" 2>&1 &
pids=($!)
stream() {  # one method's cells in priority order, each capped by the time left
  for b in 3 4 6; do
    left=$((TOTAL_CAP - $(elapsed)))
    [ "$left" -gt 5 ] || return
    timeout "$left" $PY -m benchmarks.accuracy --models vit --methods "$1" --bits "$b" --seeds 0 --calib 1024 \
      --device "$DEVICE" --out "$WORK/acc_$1_w$b" ${ACC_ARGS:-} > "$WORK/acc_$1_w$b.log" 2>&1 \
      && echo "cell $1 W$b/A$b done at $(elapsed) s" || echo "cell $1 W$b/A$b stopped at $(elapsed) s"
  done
}
for m in $STREAM_METHODS; do stream "$m" & pids+=($!); done
wait "${pids[@]}"  # not a bare wait: that would also wait for the tee above
tail -3 "$WORK/test_cuda.log"
for f in "$WORK"/deit_*/gpu.md "$WORK"/acc_*/accuracy.md; do [ -f "$f" ] && sed -n 3,99p "$f"; done
tar czf "$OUT/results.tgz" -C "$WORK" .
echo "packed at $(elapsed) s"
