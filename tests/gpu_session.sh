#!/usr/bin/env bash
# Everything that needs a GPU, in as few device calls as possible (each call <= 10 minutes).
#
# Here, once:   ../shared/tools/gpu-wheels.sh .whl && echo /.whl/ >> .git/info/exclude
#               python3 -m pip download -q --no-deps --only-binary=:all: -d .whl torchao==0.18.0
# On the device machine (the `run` tool, carry [".whl"]), one stage per call:
#   bash tests/gpu_session.sh check       # GPU tests: kernel parity bf16/fp16, kernel on/off training
#   bash tests/gpu_session.sh attention   # mmpretrain bench attention, every shape and backend
#   bash tests/gpu_session.sh tiles       # bench attention --sweep: tile sizes and backward plans
#   bash tests/gpu_session.sh train       # bench train ViT-B/32, B/16, L/14 vs compiled OpenCLIP
#   bash tests/gpu_session.sh levers      # ViT-B/16: per-step sync, compile, triton, CUDA graphs,
#                                         # foreach AdamW, fused loss, overlap_comm
#                                         # (with and without epilogue_sync),
#                                         # contiguous_gradients, compile_scope, float8;
#                                         # bench loss (fp32, TF32)
#   bash tests/gpu_session.sh memory      # ViT-g/14 .. ViT-e/14, ZeRO-3 (+ offload), capped at 80 GB
#   bash tests/gpu_session.sh shards      # ViT-B/16 from real JPEG shards (8 workers) vs synthetic
#   bash tests/gpu_session.sh loader      # ViT-B/32 from 500- and 384-px shards; bench data, 8 workers
#   bash tests/gpu_session.sh copies      # real shards, batch copies on a side stream or not
#   bash tests/gpu_session.sh quick       # what matters most, in one call of <= 9 minutes
#                                         # (a 15-minute device budget): see quick() below
#   bash tests/gpu_session.sh rest        # the GPU tests quick leaves out, on a warm machine
#   bash tests/gpu_session.sh profile     # where ViT-B/16's step time goes, ours vs OpenCLIP
#   bash tests/gpu_session.sh syncs       # host waits inside a step; the overlap path's epilogue;
#                                         # the lagged flag read; batch copies on a side stream
#   bash tests/gpu_session.sh compare     # ViT-B/16 and B/32 vs compiled OpenCLIP, <= 5 minutes
#   bash tests/gpu_session.sh autotune    # ViT-B/16 with compile_mode=max-autotune (AUTOTUNE_LIMIT s)
#   bash tests/gpu_session.sh float8      # engine.float8 (torchao): B/16 two recipes, B/32, L/14
#   bash tests/gpu_session.sh all         # check, attention, train (may not fit one call)
# Results land in $OUT (logs and JSON; at most 8 files come back).
set -uo pipefail
stage=${1:-all}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
if [ -d .whl ] && [ ! -d .gpu-site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target .gpu-site .whl/*.whl
fi
export PYTHONPATH=$PWD/.gpu-site:$PWD PYTHONUNBUFFERED=1 WANDB_MODE=disabled
py=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/env.txt" 2>&1
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  >> "$OUT/env.txt" 2>&1

check() {
  $py -m pytest -q -m gpu tests/ -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?" | tee -a "$OUT/gpu_tests.log"
}

attention() {
  $py -m mmpretrain.cli bench attention --json "$OUT/attention.json" \
    > "$OUT/attention.txt" 2>&1
  echo "bench attention rc=$?"; cat "$OUT/attention.txt" | tail -30
}

tiles() {
  $py -m mmpretrain.cli bench attention --sweep --json "$OUT/tiles.json" \
    > "$OUT/tiles.txt" 2>&1
  echo "bench attention --sweep rc=$?"; cat "$OUT/tiles.txt" | tail -30
}

train() {
  : > "$OUT/train.jsonl"
  for spec in "vit_b32 512" "vit_b16 256" "vit_l14 128"; do
    set -- $spec
    $py -m mmpretrain.cli bench train --model "$1" --batch "$2" --zero 1 --steps 20 \
      --warmup 8 --compare open_clip --json > "$OUT/train_$1.out" 2>> "$OUT/train.log"
    echo "bench train $1 rc=$?"
    tail -n 1 "$OUT/train_$1.out" >> "$OUT/train.jsonl"  # the report is the last line
    cat "$OUT/train_$1.out" >> "$OUT/train.log" && rm "$OUT/train_$1.out"
  done
  tail -c 3000 "$OUT/train.jsonl"
}

levers() {
  : > "$OUT/levers.jsonl"
  # the contrastive loss alone (what each rank computes without local_loss), plain vs fused,
  # with fp32 and with TF32 matmuls (engine.tf32)
  : > "$OUT/loss.txt"
  for tf32 in "" "--tf32"; do
    timeout -k 10 120 $py -m mmpretrain.cli bench loss --batches 4096,16384,32768,65536 \
      $tf32 --json "$OUT/loss$tf32.json" 2>> "$OUT/levers.log" | tee -a "$OUT/loss.txt"
  done
  for variant in "--sync-each-step" "" "engine.compile=true" "model.attention=triton" \
                 "engine.compile=true model.attention=triton" \
                 "engine.compile=true engine.compile_mode=reduce-overhead" \
                 "engine.compile=true engine.compile_mode=reduce-overhead model.attention=triton" \
                 "optim.impl=foreach" "loss.fused=true" \
                 "engine.compile=true engine.overlap_comm=true engine.contiguous_gradients=true" \
                 "engine.compile=true engine.overlap_comm=true engine.contiguous_gradients=true engine.epilogue_sync=true" \
                 "engine.compile=true engine.contiguous_gradients=true" \
                 "engine.compile=true engine.compile_scope=blocks" \
                 "engine.compile=true engine.float8=tensorwise"; do
    timeout -k 10 100 $py -m mmpretrain.cli bench train --model vit_b16 --batch 256 --zero 1 \
      --steps 20 --warmup 8 --json $variant > "$OUT/lever.out" 2>> "$OUT/levers.log"
    echo "bench train vit_b16 [$variant] rc=$?"
    tail -n 1 "$OUT/lever.out" >> "$OUT/levers.jsonl"
    cat "$OUT/lever.out" >> "$OUT/levers.log" && rm "$OUT/lever.out"
  done
  $py - "$OUT/levers.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    try:
        r = json.loads(line)["mmpretrain"]
    except (ValueError, KeyError):
        continue
    print(f"{r['samples_per_s']:9.1f} samples/s  mfu {r['mfu']}  {r['overrides']}"
          f"{' sync-each-step' if r['sync_each_step'] else ''}")
PY
}

# The largest CLIP on one 80 GB GPU: the allocator capped to an H100 80GB's 79.1 GiB (the
# H200 has more), activation checkpointing; each record carries `bench memory`'s prediction.
# An out-of-memory run ends with exit status 3 and a record saying so.
memory() {
  : > "$OUT/memory.jsonl"
  local common="--steps 3 --warmup 1 --gpu-memory 79.1 --json model.activation_checkpointing=true"
  for spec in "vit_bigg14 64" \
              "vit_g14 64 engine.offload_optimizer=true" \
              "vit_bigg14 64 engine.offload_optimizer=true" \
              "vit_e14 64 engine.offload_optimizer=true"; do
    set -- $spec
    local model=$1 batch=$2; shift 2
    timeout -k 10 240 $py -m mmpretrain.cli bench train --model "$model" --batch "$batch" \
      --zero 3 $common "$@" > "$OUT/mem.out" 2>> "$OUT/memory.log"
    echo "bench train $model $* rc=$?"
    tail -n 1 "$OUT/mem.out" >> "$OUT/memory.jsonl"
    cat "$OUT/mem.out" >> "$OUT/memory.log" && rm "$OUT/mem.out"
  done
  free -g >> "$OUT/memory.log"
}

# step SECONDS NAME COMMAND...: run COMMAND with a time limit, its output appended to $log
step() {
  local limit=$1 name=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)" >> "$log"
  timeout -k 10 "$limit" "$@" >> "$log" 2>&1
  echo "== $name rc=$? in $((SECONDS - t0))s" | tee -a "$log"
}

# triton_choice FILE: which of ViT-B/16's two training attention classes (image 197 tokens,
# causal text 77) FILE's speed table gives the Triton kernel: none, mixed or all
triton_choice() {
  $py - "$1" <<'PY' 2>/dev/null || echo none
import sys
from mmpretrain.kernels import speeds
table = speeds.load_speed_table(sys.argv[1])
picks = [bool(c and c.train) for c in (table.get((197, 197, 64, False, "bfloat16")),
                                       table.get((77, 77, 64, True, "bfloat16")))]
print("all" if all(picks) else "mixed" if any(picks) else "none")
PY
}

# One call for a short device budget: every step has its own time limit and appends to
# $OUT/quick.txt as it finishes, so a step that hangs or fails costs only its own slot.
quick() {
  log="$OUT/quick.txt"
  : > "$log"
  step 110 "kernel parity (bf16, fp16; split, fused, resident, chunked backward)" $py -m \
    pytest -q -m gpu -p no:cacheprovider -k "not training" tests/test_attention_triton.py
  # the default tiles (`triton`: the resident backward for ViT-B/16 and text, fused 64x64 for
  # the L/14 shapes; `triton_fused`: 64x64 everywhere, version 5's; `triton_chunked`: the
  # resident kernel on 256-row chunks, the L/14 shapes' candidate; `triton_resident_v6`:
  # the resident kernel with version 6's mma.sync products, against version 8's in `triton`);
  # the Triton kernels are first compiled in parallel (--precompile-workers; not v6's)
  step 100 "bench attention" $py -m mmpretrain.cli bench attention --warmup 5 --iters 30 \
    --shapes vit_b16,vit_l14,vit_l14_336,text_causal --json "$OUT/attention.json" \
    --impls triton,triton_resident_v6,triton_split,triton_fused,triton_chunked,sdpa_flash,sdpa_cudnn
  local common=(bench train --zero 1 --steps 15 --warmup 6)
  # timed steps first, then 3 profiled ones of each: the phase timeline (device busy/idle per
  # forward, backward and optimizer step, and the host ops the device waited on) side by side
  # (both sides compile the whole model as one graph: engine.compile_scope=auto on one GPU)
  step 160 "bench train vit_b16 compiled vs compiled OpenCLIP, profiled" $py -m mmpretrain.cli \
    "${common[@]}" --model vit_b16 --batch 256 --compare open_clip --profile "$OUT/prof" \
    engine.compile=true
  # the Triton kernel in training where the table just measured has it beat SDPA (everywhere,
  # or per shape class with model.attention_speeds); where it lost both of ViT-B/16's classes,
  # the run is predictably slower, so this slot times the float8 linear layers instead
  local attn=() limit=80
  case "$(triton_choice "$OUT/attention.json")" in
    all) attn=(model.attention=triton) ;;
    mixed) attn=("model.attention_speeds=$OUT/attention.json") ;;
    *) attn=(engine.float8=tensorwise) limit=90 ;;  # more to compile: the casts
  esac
  step $limit "bench train vit_b16 compiled + ${attn[*]}" $py -m mmpretrain.cli \
    "${common[@]}" --model vit_b16 --batch 256 engine.compile=true "${attn[@]}"
  step 130 "bench train vit_l14 compiled vs compiled OpenCLIP" $py -m mmpretrain.cli \
    "${common[@]}" --model vit_l14 --batch 128 --compare open_clip engine.compile=true
  grep -E "^==|^precompile|compiled while|samples/s|ratio|ms |^(vit|text)|profile mm|^ +(phase|forward|backward|optimizer|other) |^device idle|^ +[0-9.]+ ms  " "$log" \
    | tail -120
}

# torch.compile's max-autotune for the blocks (Triton matmul templates with bias, GELU and
# residual epilogues fused, where they beat cuBLAS), ViT-B/16: compare with quick's B/16 line
# (the default mode, same command otherwise). Autotuning compiles for minutes: run it on a
# warm machine right after quick, in what is left of the budget.
autotune() {
  log="$OUT/autotune.txt"
  : > "$log"
  step "${AUTOTUNE_LIMIT:-300}" "vit_b16 compiled, max-autotune" $py -m mmpretrain.cli bench \
    train --model vit_b16 --batch 256 --zero 1 --steps 15 --warmup 6 engine.compile=true \
    engine.compile_mode=max-autotune
  grep -E "^==|samples/s|compiled while" "$log"
}

# Where ViT-B/16's step time goes, ours (compiled and eager) next to compiled OpenCLIP
# (`bench train --profile`: busy time by kernel family, top ops, Chrome traces in $OUT/prof*),
# and the ZeRO stage and gradient clipping as suspects.
profile() {
  log="$OUT/profile.txt"
  : > "$log"
  local b16=(bench train --model vit_b16 --batch 256 --steps 10 --warmup 5)
  step 160 "vit_b16 compiled, profiled, vs compiled OpenCLIP" $py -m mmpretrain.cli \
    "${b16[@]}" --zero 1 --compare open_clip --profile "$OUT/prof" engine.compile=true
  step 60 "vit_b16 eager, profiled" $py -m mmpretrain.cli "${b16[@]}" --zero 1 \
    --profile "$OUT/prof_eager"
  step 90 "vit_b16 compiled, ZeRO 0" $py -m mmpretrain.cli "${b16[@]}" --zero 0 \
    engine.compile=true
  step 90 "vit_b16 compiled, no gradient clipping" $py -m mmpretrain.cli "${b16[@]}" --zero 1 \
    engine.compile=true optim.grad_clip=0
  # the host's work per step with real CUDA launches: ViT-B/16's host twin (widths 32, every
  # parameter tensor kept; engine/host_twin.py), ours and OpenCLIP's, on the GPU
  step 180 "vit_b16 host twins: one graph, block by block, OpenCLIP's (interleaved)" $py -m \
    mmpretrain.cli bench host-ab --model vit_b16 --compare open_clip --variant \
    "engine.compile=true" --variant "engine.compile=true engine.compile_scope=blocks"
  grep -E "^==|samples/s|ratio|step time|x  " "$log"
}

# What makes the host wait inside a step (torch.cuda.set_sync_debug_mode, by calling line); the
# overlap path's stream-ordered epilogue against DeepSpeed's synchronizing one; the flag and
# log-line reads that leave the next step queued and the batch copies on their own stream:
# gpu tests, at most ~6 minutes on a warm machine.
syncs() {
  # the lines behind each host wait, ZeRO-3's and ZeRO-0's too (the gpu test holds all but
  # those two `_info` runs to the rule; it runs the same check, so pytest leaves it out)
  timeout -k 10 150 $py tests/gpu_checks.py host_syncs "$OUT/host_syncs" \
    > "$OUT/syncs.log" 2>&1
  echo "host_syncs rc=$?" | tee -a "$OUT/syncs.log"; grep '^RESULT' "$OUT/syncs.log"
  timeout -k 10 "${SYNCS_LIMIT:-200}" $py -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_engine.py tests/test_engine_units.py tests/test_copies.py tests/test_steplog.py \
    -k "stream_ordered_epilogue or next_step_queued or copy or copies" >> "$OUT/syncs.log" 2>&1
  echo "gpu tests (epilogue, flags, log lines, copies) rc=$?" | tee -a "$OUT/syncs.log"
  tail -n 20 "$OUT/syncs.log"
}

# Ours against compiled OpenCLIP in one short call (<= 5 minutes): ViT-B/16 compiled (SDPA,
# then Triton), ViT-B/32.
compare() {
  log="$OUT/compare.txt"
  : > "$log"
  local common=(--zero 1 --steps 15 --warmup 6)
  step 130 "vit_b16 compiled vs compiled OpenCLIP" $py -m mmpretrain.cli bench train \
    --model vit_b16 --batch 256 "${common[@]}" --compare open_clip engine.compile=true
  step 50 "vit_b16 compiled + triton attention" $py -m mmpretrain.cli bench train \
    --model vit_b16 --batch 256 "${common[@]}" engine.compile=true model.attention=triton
  step 100 "vit_b32 compiled vs compiled OpenCLIP" $py -m mmpretrain.cli bench train \
    --model vit_b32 --batch 512 "${common[@]}" --compare open_clip engine.compile=true
  grep -E "^==|samples/s|ratio" "$log"
}

# The blocks' linear layers in float8 (engine.float8, torchao), compiled: ViT-B/16 with each
# recipe, ViT-B/32 and ViT-L/14 with the fastest; compare with quick's and compare's bf16 lines.
float8() {
  log="$OUT/float8.txt"
  : > "$log"
  local common=(--zero 1 --steps 15 --warmup 6 engine.compile=true)
  for recipe in tensorwise rowwise; do
    step 80 "vit_b16 compiled, float8 $recipe" $py -m mmpretrain.cli bench train \
      --model vit_b16 --batch 256 "${common[@]}" engine.float8=$recipe
  done
  step 70 "vit_b32 compiled, float8 tensorwise" $py -m mmpretrain.cli bench train \
    --model vit_b32 --batch 512 "${common[@]}" engine.float8=tensorwise
  step 90 "vit_l14 compiled, float8 tensorwise" $py -m mmpretrain.cli bench train \
    --model vit_l14 --batch 128 "${common[@]}" engine.float8=tensorwise
  grep -E "^==|samples/s|float8" "$log"
}

# The GPU tests `quick` leaves out (training with the kernel on and off, the fast path against
# the reference path, CoCa in bf16, the fused loss, the memory prediction), for a warm machine
# with what is left of the budget: REST_LIMIT seconds in all (default 240).
rest() {
  timeout -k 10 "${REST_LIMIT:-240}" $py -m pytest -q -m gpu -p no:cacheprovider tests/ \
    -k "not test_gpu_parity and not heuristic_plan and not packed_matches" \
    > "$OUT/gpu_rest.log" 2>&1
  echo "gpu tests (rest) rc=$?" | tee -a "$OUT/gpu_rest.log"; tail -n 40 "$OUT/gpu_rest.log"
}

# bench_shards LOG [LONG_SIDE]: write (once) the photo-like JPEG shards of `bench data`, their
# images LONG_SIDE px on the longer side (500 by default), and print their brace pattern
bench_shards() {
  local side=${2:-500} dir=/tmp/mmpretrain-bench-shards
  [ "$side" = 500 ] || dir=$dir-$side
  $py -c "from mmpretrain.data.bench import make_bench_shards as m
print(m('$dir', long_side=$side)['pattern'])" 2>> "$1" | tail -n 1
}

# ViT-B/16 fed from real JPEG shards (8 workers) next to synthetic data: the issue allows 5%.
shards() {
  local pattern; pattern=$(bench_shards "$OUT/shards.log")
  echo "$pattern" > "$OUT/shards_pattern.txt"
  : > "$OUT/shards.jsonl"
  for data in synthetic "$pattern"; do
    timeout -k 10 240 $py -m mmpretrain.cli bench train --model vit_b16 --batch 256 --zero 1 \
      --steps 30 --warmup 8 --workers 8 --data "$data" --json engine.compile=true \
      > "$OUT/shards.out" 2>> "$OUT/shards.log"
    echo "bench train vit_b16 data=$data rc=$?"
    tail -n 1 "$OUT/shards.out" >> "$OUT/shards.jsonl"
  done
  tail -c 2000 "$OUT/shards.jsonl"
}

# ViT-B/32 at batch 512, the model whose target asks the most samples/s of the loader: the
# loader alone with 8 workers on this machine's cores, then training from 500-px and 384-px
# shards against synthetic batches (PERFORMANCE.md, "Stored image size": on the 2-vCPU CPU
# machine 8 workers would fall short of B/32's 1.2x target with 500-px images)
loader() {
  log="$OUT/loader.txt"
  : > "$log"
  local p500 p384
  p500=$(bench_shards "$log" 500)
  p384=$(bench_shards "$log" 384)
  for pattern in "$p500" "$p384"; do
    # 240 timed batches: the 8 workers' prefetched backlog (16 batches) stays a small part
    step 120 "bench data, 8 workers, $pattern" $py -m mmpretrain.cli bench data \
      --shards "$pattern" --workers 8 --batches 240
  done
  for data in synthetic "$p500" "$p384"; do
    step 150 "bench train vit_b32 512, data=$data" $py -m mmpretrain.cli bench train \
      --model vit_b32 --batch 512 --zero 1 --steps 30 --warmup 8 --workers 8 --data "$data" \
      engine.compile=true
  done
  grep -E "^==|^data bench|^shards|^per sample|^TrainStream|samples/s|data.wait" "$log" | tail -40
}

# Real shards with the batch copies on a side stream (the default) and on the compute stream
# (engine.copy_stream=false, before 2026-12-02), interleaved: the copy of ViT-B/16's 38.5 MB
# of images per step either hides behind the previous step or adds to it.
copies() {
  local pattern; pattern=$(bench_shards "$OUT/copies.log")
  : > "$OUT/copies.jsonl"
  local limit=190  # the first run compiles; the others find Inductor's cache warm
  for side in true false true; do
    timeout -k 10 $limit $py -m mmpretrain.cli bench train --model vit_b16 --batch 256 --zero 1 \
      --steps 30 --warmup 8 --workers 8 --data "$pattern" --json engine.compile=true \
      "engine.copy_stream=$side" > "$OUT/copies.out" 2>> "$OUT/copies.log"
    echo "bench train vit_b16 shards copy_stream=$side rc=$?"
    tail -n 1 "$OUT/copies.out" >> "$OUT/copies.jsonl"
    limit=130
  done
  grep -o '"overrides": [^]]*]\|"samples_per_s": [0-9.]*\|"data_wait_frac": [0-9.e-]*' \
    "$OUT/copies.jsonl"
}

case "$stage" in
  check) check ;;
  attention) attention ;;
  tiles) tiles ;;
  train) train ;;
  levers) levers ;;
  memory) memory ;;
  quick) quick ;;
  shards) shards ;;
  loader) loader ;;
  copies) copies ;;
  rest) rest ;;
  profile) profile ;;
  syncs) syncs ;;
  compare) compare ;;
  autotune) autotune ;;
  float8) float8 ;;
  all) check; attention; train ;;
  *) echo "unknown stage $stage (check|attention|tiles|train|levers|memory|quick|rest|profile|syncs|compare|autotune|float8|shards|all)"; exit 2 ;;
esac
