#!/usr/bin/env bash
# The recipe study on full CIFAR-10 behind the README's "Full CIFAR-10" section, on a CPU.
#
#   scripts/cifar10_full_study.sh [--data DIR] [--out DIR] [--seeds 42,99,123] [VARIANT ...]
#
# Settings: conf/experiment/cifar10_full.yaml (45,000 train / 5,000 validation images, a
# 15-epoch cosine ResNet-18 teacher from scratch at 32x32, students at ~1/3 of its MACs, 8
# epochs after pruning). Every run reports validation top1. One run dir per variant and seed,
# <out>/runs/<variant>/seed<N>; teachers and MI scores are shared through <out>/cache, so each
# seed's teacher trains once. VARIANT (default: all, in this order):
#   default     m2mdc's default recipe, with the Torch-Pruning peer at the student's MACs and
#               at its measured batch-1 latency (compare=[torch_pruning], peer.match=[macs,latency])
#   kl          kd=kl: CE + T^2 KL at T=4, unramped (the peer's own loss)
#   kl_sparse   kd=kl and an L1 penalty on the BN scales of the groups slicing cuts
#               (kd.sparsity.weight=3e-4, linear ramp)
#   kl_gradual  kd=kl and slice.schedule=gradual (channels decayed to zero over the repair)
#   kl_2_6      kd=kl with 2 distill epochs and 6 repair epochs (2 per sliced stage; 8 in
#               all, as every variant)
#   budget      recipe=budget at the default's MAC fraction (budget.macs=0.3151), 4 distill
#               epochs (it also slices layer1: 4 repair epochs)
# Each variant's wall time goes to <out>/runs/<variant>/seed<N>.seconds; the report of every
# run so far to <out>/report (m2mdc report).
#
# --data: the extracted training tree (default: extract ../shared/data/cifar10-train.zip into
# $TMPDIR/m2mdc-cifar10-full once). --out: default outputs/studies/cifar10_full.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=""
OUT=outputs/studies/cifar10_full
SEEDS=42,99,123
VARIANTS=()
ALL=(default kl kl_2_6 kl_sparse kl_gradual budget)
while [[ $# -gt 0 ]]; do
  case "$1" in
    --data) DATA="${2:?--data needs a directory}"; shift 2 ;;
    --out) OUT="${2:?--out needs a directory}"; shift 2 ;;
    --seeds) SEEDS="${2:?--seeds needs a list, e.g. 42,99}"; shift 2 ;;
    -h | --help) sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "cifar10_full_study.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    *)
      [[ " ${ALL[*]} " == *" $1 "* ]] || {
        echo "cifar10_full_study.sh: unknown variant '$1'; choose from: ${ALL[*]}" >&2; exit 2
      }
      VARIANTS+=("$1"); shift ;;
  esac
done
[[ ${#VARIANTS[@]} -gt 0 ]] || VARIANTS=("${ALL[@]}")

M2MDC=${M2MDC:-}
if [[ -z "$M2MDC" ]]; then
  if [[ -x .venv/bin/m2mdc ]]; then M2MDC=.venv/bin/m2mdc; else M2MDC=m2mdc; fi
fi

if [[ -z "$DATA" ]]; then
  ZIP=../shared/data/cifar10-train.zip
  DATA="${TMPDIR:-/tmp}/m2mdc-cifar10-full"
  if [[ ! -d "$DATA/train" ]]; then
    [[ -f "$ZIP" ]] || { echo "cifar10_full_study.sh: $ZIP not found; pass --data DIR" >&2; exit 2; }
    mkdir -p "$DATA"
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$ZIP" "$DATA"
  fi
fi

overrides() {  # the variant's settings on top of experiment=cifar10_full
  case "$1" in
    default) echo "compare=[torch_pruning] peer.match=[macs,latency]" ;;
    kl) echo "kd=kl compare=[]" ;;
    kl_sparse) echo "kd=kl kd.sparsity.weight=3e-4 kd.sparsity.kind=bn_l1 kd.sparsity.ramp=linear compare=[]" ;;
    kl_gradual) echo "kd=kl slice.schedule=gradual compare=[]" ;;
    kl_2_6) echo "kd=kl kd.epochs=2 slice.repair_epochs=2 compare=[]" ;;
    budget) echo "recipe=budget budget.macs=0.3151 kd.epochs=4 compare=[]" ;;
  esac
}

set -f  # the overrides' brackets are Hydra lists, not globs
for seed in ${SEEDS//,/ }; do
  for v in "${VARIANTS[@]}"; do
    dir="$OUT/runs/$v/seed$seed"
    t0=$SECONDS
    # shellcheck disable=SC2046  # the variant's overrides are words
    "$M2MDC" run experiment=cifar10_full "dataset.root=$DATA" "cache_dir=$OUT/cache" \
      "seed=$seed" "hydra.run.dir=$dir" $(overrides "$v")
    echo $((SECONDS - t0)) >"$dir.seconds"
    echo "cifar10_full_study.sh: $v seed $seed took $(cat "$dir.seconds") s"
  done
done
"$M2MDC" report "$OUT/runs" --out "$OUT/report"
