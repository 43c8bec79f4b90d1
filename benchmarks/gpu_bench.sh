#!/usr/bin/env bash
# The GPU measurements of issue #11, as one script for a lent H100/H200 (no network needed), in order of
# importance, each part under its own time limit inside one overall budget (parts that no longer fit are
# reported as skipped, never guessed):
#   0. the optimizer step alone: prx's Muon (same-shape matrices stacked; eager and with its memory-bound work
#      compiled) against torch.optim.Muon
#   1. the seed config with the full recipe at 512 px without CUDA graphs (train.cuda_graphs=off: the blocks compiled
#      for static shapes, the teachers compiled, the optimizer eager): the anchor whose losses the next parts match
#   2. the same with the defaults (the blocks and the teachers replayed as CUDA graphs, the optimizer's passes
#      compiled, the caption cache on the GPU): images/s, MFU with honest FLOPs, each phase's host time, the host's
#      wait for the device, then a profile (OUT/seed512_recipe.profile.txt: how busy the GPU is, launches and host
#      waits per step)
#   3. the same with the caption cache on the host (text.cache_device=cpu, the default until 2026-12-04: each
#      step's text batch built on the host and copied over)
#   4. the same with the teachers launched kernel by kernel (train.cuda_graphs_teachers=off, the default until
#      2026-12-04)
#   5. the same with the optimizer's passes eager
#   6. the same with THREADS (default 4) CPU threads for torch, not one per core: does the host's own tensor work
#      (pinned copies, the text batch) wait on threads the data's render threads keep off the cores?
#   7. FSDP2 on one GPU (torchrun, 1 process: no CUDA graphs)       8. the same with the teachers not compiled
#   9. the same with the captions encoded in the step
#  10. the same eager (the compile speed-up)       11. the same without TREAD (the TREAD speed-up)
#  12. twice the batch per GPU (Muon and the step's fixed costs amortised)
#  13. the attention kernels the text padding mask allows (benchmarks/attention_kernels.py)
#  14. the largest micro-batch at 1024 px
# Teachers are full-size with random weights (same FLOPs); every batch carries 256 text tokens
# (text.min_length=256, as long captions do: the FLOP count assumes them).
#   bash benchmarks/gpu_bench.sh [OUT_DIR]     # BUDGET=seconds (default 600); TEXT=encoder (default random-minilm:
#                                              # MiniLM's shape, random weights, built in: no wheel, no network);
#                                              # SKIP="attention ..." leaves parts out
# Captions are encoded before the timed steps (a long run's cache, or `prx data embed`, serves them).
# Everything lands in OUT_DIR: log.txt (all output, the summary last) and the per-part JSON files.
set -uo pipefail
OUT=${1:-${OUT:-bench-gpu}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PRX="$PY -m prx"
TEXT=${TEXT:-random-minilm}
THREADS=${THREADS:-4}
BUDGET=${BUDGET:-600}
START=$SECONDS
LOG="$OUT/log.txt"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

# options every run shares: full-size random-weight teachers (the smoke run: the tiny model and teachers)
SHARED="repa.teacher=random-dinov3-vitl16 perceptual.dino_model=random-dinov2-base perceptual.lpips_vgg_weights=random-vgg16"
TEXTOPT="text.encoder=$TEXT text.max_length=256 text.min_length=256"
S512="train.stages=[{resolution: 512, steps: 100, batch_size: 32}]"
MB=32 S1024="train.stages=[{resolution: 1024, steps: 100, batch_size: 64, repa: false}]" PROBE=64,48,32,24,16,8
ATTN="--image-tokens 256 1024"
MUON="--preset seed --text-dim 384 --device cuda"
if [[ ${SMOKE:-0} == 1 ]]; then  # the script's own check on a CPU: toy sizes, same parts
  SHARED="model.preset=tiny repa.teacher=tiny-random-dinov3 perceptual.dino_model=tiny-random-dinov2 perceptual.lpips_vgg_weights=tiny-random-vgg16 perceptual.dino_resolution=28 repa.block=2 tread.start_block=1 tread.end_block=-1"
  TEXTOPT="text.encoder=$TEXT text.max_length=32 text.min_length=32"
  S512="train.stages=[{resolution: 64, steps: 100, batch_size: 4}]"
  MB=4 S1024="train.stages=[{resolution: 128, steps: 100, batch_size: 4, repa: false}]" PROBE=4,2
  ATTN="--batch 2 --heads 2 --text-tokens 32 --image-tokens 64 --repeats 3"
  MUON="--preset tiny --text-dim 32 --device cpu --repeats 2"
fi

# part NAME LIMIT_SECONDS COMMAND...: run under the smaller of its limit and what is left of the budget
part() {
  local name=$1 limit=$2
  shift 2
  if [[ " ${SKIP:-} " == *" $name "* ]]; then
    echo "== $name: skipped (SKIP)" | tee -a "$SUMMARY"
    return
  fi
  local left=$((BUDGET - (SECONDS - START)))
  ((left < limit)) && limit=$left
  if ((limit < 20)); then
    echo "== $name: skipped (${left}s of the budget left)" | tee -a "$SUMMARY"
    return
  fi
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$SUMMARY"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  part muon_step 100 $PY benchmarks/muon_cost.py $MUON
  part seed512_before 200 $PRX bench speedrun $SHARED $TEXTOPT "$S512" train.micro_batch_size=$MB \
    train.cuda_graphs=off --steps 10 --warmup 3 --json "$OUT/seed512_before.json"
  part seed512_recipe 200 $PRX bench speedrun $SHARED $TEXTOPT "$S512" train.micro_batch_size=$MB \
    --steps 10 --warmup 3 --json "$OUT/seed512_recipe.json" --profile "$OUT/seed512_recipe.profile.txt"
  part seed512_text_on_host 120 $PRX bench speedrun $SHARED $TEXTOPT "$S512" train.micro_batch_size=$MB \
    text.cache_device=cpu --steps 10 --warmup 3 --json "$OUT/seed512_text_on_host.json"
  part seed512_teachers_no_graphs 130 $PRX bench speedrun $SHARED $TEXTOPT "$S512" train.micro_batch_size=$MB \
    train.cuda_graphs_teachers=off --steps 10 --warmup 3 --json "$OUT/seed512_teachers_no_graphs.json"
  part seed512_graphs_optimizer_eager 90 $PRX bench speedrun $SHARED $TEXTOPT "$S512" train.micro_batch_size=$MB \
    train.compile_optimizer=off --steps 10 --warmup 3 --json "$OUT/seed512_graphs_optimizer_eager.json"
  part seed512_host_threads 90 $PRX bench speedrun $SHARED $TEXTOPT "$S512" train.micro_batch_size=$MB \
    train.num_threads=$THREADS --steps 10 --warmup 3 --json "$OUT/seed512_host_threads.json"
  part seed512_fsdp1 120 $PY -m torch.distributed.run --standalone --nproc_per_node 1 -m prx bench speedrun \
    $SHARED $TEXTOPT "$S512" train.micro_batch_size=$MB train.parallel=fsdp --steps 10 --warmup 3 \
    --json "$OUT/seed512_fsdp1.json"
  part seed512_teachers_eager 120 $PRX bench speedrun $SHARED $TEXTOPT "$S512" train.micro_batch_size=$MB \
    train.compile_teachers=off --steps 10 --warmup 3 --json "$OUT/seed512_teachers_eager.json"
  part seed512_encode_text 90 $PRX bench speedrun $SHARED $TEXTOPT "$S512" train.micro_batch_size=$MB \
    --encode-text --steps 10 --warmup 3 --json "$OUT/seed512_encode_text.json"
  part seed512_eager 90 $PRX bench speedrun $SHARED $TEXTOPT "$S512" train.micro_batch_size=$MB train.compile=off \
    --steps 5 --warmup 2 --json "$OUT/seed512_eager.json"
  part seed512_dense 120 $PRX bench speedrun $SHARED $TEXTOPT "$S512" train.micro_batch_size=$MB \
    tread.route_ratio=0 sampling.guidance=cfg --steps 20 --warmup 3 --json "$OUT/seed512_dense.json"
  part seed512_batch64 120 $PRX bench speedrun $SHARED $TEXTOPT "${S512/batch_size: $MB/batch_size: $((2 * MB))}" \
    train.micro_batch_size=$((2 * MB)) --steps 10 --warmup 3 --json "$OUT/seed512_batch64.json"
  part attention 90 $PY benchmarks/attention_kernels.py $ATTN --json "$OUT/attention.json"
  part seed1024_micro_batch 150 $PRX bench speedrun $SHARED $TEXTOPT \
    "$S1024" train.micro_batch_size=$MB --largest-micro-batch $PROBE --json "$OUT/seed1024_micro_batch.json"
  echo "== summary (${SECONDS}s)"
  cat "$SUMMARY"
  $PY benchmarks/gpu_summary.py "$OUT"
} 2>&1 | tee "$LOG"
