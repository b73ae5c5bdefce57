#!/usr/bin/env bash
# Reproduce the sweeps behind the M2M-DC paper's Tables 1-6, then write the report.
#
#   scripts/reproduce_paper.sh [--dry-run] [--out DIR] [--launcher joblib|submitit_local|submitit_slurm]
#                              [-- extra overrides for every job, e.g. hydra.launcher.n_jobs=2]
#
# For each of experiment=paper_resnet18, paper_resnet34, paper_mobilenetv2 (section 4.1
# settings: ImageNet-pretrained teacher, CIFAR-100 at 224x224, 5 teacher + 5 KD epochs;
# MobileNetV2 is not sliced, as in Table 6):
#   - seeds 42, 99, 123 (the seeds of Tables 1/3/5; the text of section 4.1 says {42, 123, 999})
#     x prune.ratio 0.1, 0.25, 0.4, 0.5                                   (12 jobs per model)
#   - ResNets only, the frontier keep_cfg with single-block stages
#     prune.keep_cfg={layer1:[0],layer2:[0],layer3:[0],layer4:[0]} x the 3 seeds  (3 jobs)
# 42 jobs in all, under one output root (default outputs/paper): <root>/<experiment>/<sweep>/
# <overrides>/ is one run directory. Then `m2mdc report <root>` writes report.md/.csv/.json
# and the plots into <root>. Rerunning the script resumes: finished stages are skipped, and
# teachers and block scores are shared between the jobs of a sweep (the stage cache in
# cache_dir), so a model trains 3 teachers, not 15.
#
# Needs:
#   - a CUDA GPU (device=auto picks it; the script refuses to start without one unless
#     ALLOW_CPU=1, or when jobs go to SLURM, where the submitting host may have none)
#   - internet for CIFAR-100 (torchvision download into data/cifar100, about 170 MB) and for the
#     torchvision ImageNet weights (resnet18 45 MB, resnet34 84 MB, mobilenet_v2 14 MB, into
#     the torch hub cache); offline, pre-place the CIFAR-100 python archive in data/cifar100 and
#     the weight files in $(python -c 'import torch; print(torch.hub.get_dir())')/checkpoints
#   - disk: about 10 GB under the output root and cache_dir (checkpoints and resumable
#     optimizer states of 42 runs; ResNet-34 runs are the largest at ~300 MB each)
#   - m2mdc on PATH, or this repository's .venv (make demo creates it), or M2MDC=/path/to/m2mdc
#   - for --launcher: pip install -e '.[launchers]' (hydra-joblib-launcher, hydra-submitit-launcher)
#
# GPU-time estimate (--dry-run prints it). ASSUMPTION, not a measurement: one A100-class GPU,
# fp32/TF32, CIFAR-100's 50k training images at 224x224; one "epoch-equivalent" (a training
# epoch plus its 10k-image test pass) takes 36 s for ResNet-18, 66 s for ResNet-34 and 42 s for
# MobileNetV2. A teacher (once per model and seed, cached) is ~5 epoch-equivalents (5 epochs,
# last third unfrozen); every ResNet job's student is ~11 (5 KD epochs + 3 slicing repair
# epochs, each with a teacher forward pass, plus scoring, BN recalibration and profiling), a
# MobileNetV2 job's ~8 (no slicing). Edit the table SECONDS_PER_EPOCH below for your hardware.
set -euo pipefail

usage() { sed -n '2,5p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

ROOT=outputs/paper
DRY_RUN=0
LAUNCHER=""
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --out) ROOT="${2:?--out needs a directory}"; shift 2 ;;
    --out=*) ROOT="${1#*=}"; shift ;;
    --launcher) LAUNCHER="${2:?--launcher needs joblib, submitit_local or submitit_slurm}"; shift 2 ;;
    --launcher=*) LAUNCHER="${1#*=}"; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "reproduce_paper.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$LAUNCHER" in
  "" | joblib | submitit_local | submitit_slurm) ;;
  *) echo "reproduce_paper.sh: --launcher $LAUNCHER: choose joblib, submitit_local or submitit_slurm" >&2; exit 2 ;;
esac

SEEDS=42,99,123
RATIOS=0.1,0.25,0.4,0.5
FRONTIER='prune.keep_cfg={layer1:[0],layer2:[0],layer3:[0],layer4:[0]}'
declare -A SECONDS_PER_EPOCH=([paper_resnet18]=36 [paper_resnet34]=66 [paper_mobilenetv2]=42)
declare -A STUDENT_EPOCH_EQ=([paper_resnet18]=11 [paper_resnet34]=11 [paper_mobilenetv2]=8)
TEACHER_EPOCH_EQ=5

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT="$(realpath -m "$ROOT")"  # before the cd below: --out is relative to the caller
cd "$REPO"                      # dataset.root and cache_dir are relative to the repository
if [[ -z "${M2MDC:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/m2mdc" ]]; then M2MDC="$REPO/.venv/bin/m2mdc"
  elif command -v m2mdc > /dev/null; then M2MDC=m2mdc
  else echo "reproduce_paper.sh: m2mdc not found (make demo, or set M2MDC=...)" >&2; exit 2
  fi
fi

# Every combination of comma-separated override values, one job per line. Values holding
# brackets or braces (keep_cfg) are one value: their commas belong to the value.
expand() {
  local key="${1%%=*}" vals="${1#*=}" v
  local -a list
  if [[ "$vals" == *[\{\[]* ]]; then list=("$vals"); else IFS=, read -ra list <<< "$vals"; fi
  shift
  for v in "${list[@]}"; do
    if (($#)); then expand "$@" | while IFS= read -r rest; do echo "$key=$v $rest"; done
    else echo "$key=$v"; fi
  done
}

SWEEPS=()  # "<subdir>|<experiment>|<override> ..."
for exp in paper_resnet18 paper_resnet34 paper_mobilenetv2; do
  SWEEPS+=("$exp/ratios|$exp|seed=$SEEDS prune.ratio=$RATIOS")
  [[ "$exp" == paper_mobilenetv2 ]] || SWEEPS+=("$exp/frontier|$exp|seed=$SEEDS $FRONTIER")
done

total_jobs=0
total_seconds=0
commands=()
for sweep in "${SWEEPS[@]}"; do
  IFS='|' read -r sub exp overrides <<< "$sweep"
  read -ra ov <<< "$overrides"
  mapfile -t jobs < <(expand "experiment=$exp" "${ov[@]}")
  n=${#jobs[@]}
  total_jobs=$((total_jobs + n))
  total_seconds=$((total_seconds + n * STUDENT_EPOCH_EQ[$exp] * SECONDS_PER_EPOCH[$exp]))
  cmd=("$M2MDC" run -m "experiment=$exp" "${ov[@]}"
       "hydra.sweep.dir=$ROOT/$sub"
       'hydra.sweep.subdir=${hydra.job.override_dirname}'
       'hydra.job.config.override_dirname.exclude_keys=[command,experiment,prune.keep_cfg]')
  [[ -z "$LAUNCHER" ]] || cmd+=("hydra/launcher=$LAUNCHER")
  cmd+=("${EXTRA[@]}")
  commands+=("$(printf '%q ' "${cmd[@]}")")
  if ((DRY_RUN)); then
    echo "# $sub: $n jobs"
    echo "${commands[-1]}"
    printf '  %s\n' "${jobs[@]}"
  fi
done
n_seeds=$(tr ',' '\n' <<< "$SEEDS" | wc -l)
for exp in "${!SECONDS_PER_EPOCH[@]}"; do  # teachers: once per model and seed (stage cache)
  total_seconds=$((total_seconds + n_seeds * TEACHER_EPOCH_EQ * SECONDS_PER_EPOCH[$exp]))
done
report_cmd="$(printf '%q ' "$M2MDC" report "$ROOT")"
hours="$((total_seconds / 3600)).$(((total_seconds % 3600) * 10 / 3600))"

if ((DRY_RUN)); then
  echo "# then: $report_cmd"
  echo "$total_jobs jobs; estimated GPU time ${hours} h on one A100-class GPU (assumption:" \
    "seconds per 224x224 CIFAR-100 epoch ResNet-18 ${SECONDS_PER_EPOCH[paper_resnet18]}," \
    "ResNet-34 ${SECONDS_PER_EPOCH[paper_resnet34]}, MobileNetV2" \
    "${SECONDS_PER_EPOCH[paper_mobilenetv2]}; see the header of $0)"
  exit 0
fi

if [[ "$LAUNCHER" != submitit_slurm && "${ALLOW_CPU:-0}" != 1 ]]; then
  python_bin="$(dirname "$(command -v "$M2MDC")")/python"
  [[ -x "$python_bin" ]] || python_bin=python3
  if ! "$python_bin" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "reproduce_paper.sh: no CUDA GPU visible; the paper's settings need one" \
      "(estimated ${hours} GPU-hours). ALLOW_CPU=1 runs anyway." >&2
    exit 2
  fi
fi

echo "reproduce_paper.sh: $total_jobs jobs into $ROOT (estimated ${hours} GPU-hours)"
for c in "${commands[@]}"; do
  echo "+ $c"
  eval "$c"
done
echo "+ $report_cmd"
eval "$report_cmd"
