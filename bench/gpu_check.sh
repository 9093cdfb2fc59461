#!/usr/bin/env bash
# The device check (issue 12): one command, at most 8 minutes on one H200, one JSON.
#
#   bash bench/gpu_check.sh                  # CUDA: checks + throughput, JSON in runs/gpu_check.json
#   bash bench/gpu_check.sh --dry-run        # CPU, tiny shapes: proves the script, figures mean nothing
#   bash bench/gpu_check.sh --out FILE.json  # elsewhere (on the device machine: "$OUT/gpu_check.json")
#
# What it checks and measures: bench/gpu_check.py's docstring and bench/README.md ("GPU (device
# check)"). The Python budget is 450 s (parts past it are skipped and say so); the hard limit
# below kills a run that still overstays, so the 8 minutes hold.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
# The tree's own sources, whether or not ctrltok is installed in this Python.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CTRLTOK_PROGRESS=0 TOKENIZERS_PARALLELISM=false

args=("$@")
out_given=0
dry=0
for a in "$@"; do
  case "$a" in
    --out|--out=*) out_given=1 ;;
    --dry-run) dry=1 ;;
  esac
done
if [ "$out_given" = 0 ]; then
  if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then
    args+=(--out "$OUT/gpu_check.json")
  elif [ "$dry" = 1 ]; then
    args+=(--out runs/gpu_check_dry_run.json)
  fi
fi
if [ "$dry" = 1 ]; then
  exec "$PY" bench/gpu_check.py "${args[@]}"          # CPU: as long as it takes (minutes on 2 cores)
fi
exec timeout --signal=TERM --kill-after=10 480 "$PY" bench/gpu_check.py "${args[@]}"
