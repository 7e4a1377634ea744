#!/usr/bin/env bash
# Fill slurm/train.sbatch from options and submit it; prints the job id (`--dry-run`: prints the
# filled script instead). Every argument it does not know goes to `mmpretrain train`.
#
#   slurm/submit.sh --nodes 4 --gpus-per-node 8 --time 48:00:00 --mode torchrun \
#       --config experiments/clip_vit_b16.yaml optim.lr=5e-4
#
# Options (defaults in brackets):
#   --nodes N [1]              --gpus-per-node N [8; 0 = CPU-only, no GPU request]
#   --ntasks-per-node N [= GPUs per node, or 1 when 0 GPUs]      --cpus-per-task N [8]
#   --time T [24:00:00]        --partition P [cluster default]   --job-name NAME [config name]
#   --output PATH [slurm-%x-%j.out]   --signal-lead SECONDS [120: USR1 this long before the end]
#   --mode srun|torchrun|deepspeed [srun]   --sbatch ARG (extra sbatch option, repeatable)
#   --dry-run                  print the script and the sbatch command, submit nothing
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
nodes=1 gpus=8 ntasks="" cpus=8 time=24:00:00 partition="" name="" output="slurm-%x-%j.out"
lead=120 mode=srun dry=0 extra=() train=()
while (($#)); do
  case "$1" in
    --nodes|--gpus-per-node|--ntasks-per-node|--cpus-per-task|--time|--partition|--job-name|\
    --output|--signal-lead|--mode|--sbatch)
      (($# >= 2)) || { echo "submit.sh: $1 needs a value" >&2; exit 2; } ;;&
    --nodes) nodes=$2; shift 2 ;;
    --gpus-per-node) gpus=$2; shift 2 ;;
    --ntasks-per-node) ntasks=$2; shift 2 ;;
    --cpus-per-task) cpus=$2; shift 2 ;;
    --time) time=$2; shift 2 ;;
    --partition) partition=$2; shift 2 ;;
    --job-name) name=$2; shift 2 ;;
    --output) output=$2; shift 2 ;;
    --signal-lead) lead=$2; shift 2 ;;
    --mode) mode=$2; shift 2 ;;
    --sbatch) extra+=("$2"); shift 2 ;;
    --dry-run) dry=1; shift ;;
    --config|-c) train+=("$1" "$2"); [[ -n "$name" ]] || name=$(basename "${2%.*}"); shift 2 ;;
    *) train+=("$1"); shift ;;
  esac
done
case "$mode" in srun|torchrun|deepspeed) ;; *) echo "submit.sh: bad --mode $mode" >&2; exit 2 ;; esac
for v in "$nodes" "$gpus" "$cpus" "$lead" ${ntasks:+"$ntasks"}; do
  [[ "$v" =~ ^[0-9]+$ ]] || { echo "submit.sh: '$v' is not a number" >&2; exit 2; }
done
[[ -n "$ntasks" ]] || ntasks=$(( gpus > 0 ? gpus : 1 ))
header=("--job-name=${name:-mmpretrain}" "--nodes=$nodes" "--ntasks-per-node=$ntasks")
((gpus > 0)) && header+=("--gpus-per-node=$gpus")
header+=("--cpus-per-task=$cpus" "--time=$time" "--output=$output" "--signal=B:USR1@$lead"
         --requeue --open-mode=append)
[[ -n "$partition" ]] && header+=("--partition=$partition")
header+=(${extra[@]+"${extra[@]}"})

fill() {  # the template with our #SBATCH lines, MODE and the training arguments baked in
  awk -v hdr="$(printf '#SBATCH %s\n' "${header[@]}")" -v pre="$1" '
    /^#SBATCH / { if (!done) { print hdr; print pre; done = 1 }; next } { print }' \
    "$HERE/train.sbatch"
}
preamble="export MODE=\${MODE:-$mode} MMPRETRAIN_REPO=\${MMPRETRAIN_REPO:-$(printf %q "$(dirname "$HERE")")}"
if ((${#train[@]})); then
  preamble+=$'\n'"set -- $(printf '%q ' "${train[@]}")"
fi
script=$(fill "$preamble")
if ((dry)); then
  printf '%s\n' "$script"
  echo "# submit with: sbatch --parsable <this script>" >&2
  exit 0
fi
printf '%s\n' "$script" | sbatch --parsable | cut -d';' -f1
