#!/usr/bin/env bash
# The GPU measurements, as one script for a lent H100/H200 (no network needed):
# the seed config with the full recipe at 512 px (MFU, TREAD and compile speed-ups) and the
# largest micro-batch at 1024 px. Teachers are full-size with random weights (same FLOPs).
#   bash benchmarks/gpu_bench.sh [OUT_DIR]      (about 10 minutes; results as JSON in OUT_DIR)
set -uo pipefail
OUT=${1:-${OUT:-bench-gpu}}
mkdir -p "$OUT"
PRX=${PRX:-prx}
TEACHERS="repa.teacher=random-dinov3-vitl16 perceptual.dino_model=random-dinov2-base perceptual.lpips_vgg_weights=random-vgg16 text.encoder=minilm text.max_length=256"
S512="train.stages=[{resolution: 512, steps: 100, batch_size: 32}] train.micro_batch_size=32"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
$PRX bench speedrun $TEACHERS "$S512" --steps 10 --warmup 3 --json "$OUT/seed512_recipe.json" | tee "$OUT/seed512_recipe.txt"
$PRX bench speedrun $TEACHERS "$S512" tread.route_ratio=0 sampling.guidance=cfg --steps 10 --warmup 3 --json "$OUT/seed512_dense.json" | tee "$OUT/seed512_dense.txt"
$PRX bench speedrun $TEACHERS "$S512" train.compile=off --steps 10 --warmup 2 --json "$OUT/seed512_eager.json" | tee "$OUT/seed512_eager.txt"
for mb in 32 24 16 12 8 4; do
  if $PRX bench speedrun $TEACHERS "train.stages=[{resolution: 1024, steps: 100, batch_size: $mb, repa: false}]" \
       train.micro_batch_size=$mb --steps 3 --warmup 2 --json "$OUT/seed1024_mb$mb.json" > "$OUT/seed1024_mb$mb.txt" 2>&1; then
    echo "largest micro-batch at 1024 px: $mb"; cat "$OUT/seed1024_mb$mb.txt"; break
  fi
  echo "micro-batch $mb at 1024 px: $(grep -m1 -o 'OutOfMemoryError' "$OUT/seed1024_mb$mb.txt" || echo failed)"
done
