#!/usr/bin/env bash
# The seed's inter-layer transformer (preset baseline) with one part changed at a time, each
# trained under the CPU budget of `bench predictors --budget cpu` (2 epochs x 100 steps of 128
# tokens) and scored on the VALIDATION split (an ablation, not a result to select on test).
# Usage: scripts/interlayer-ablation.sh TRACES OUT   (about 15 min on 2 cores; rerun resumes)
set -euo pipefail
traces=$1
out=$2
budget=(--param epochs=2 --param max_steps_per_epoch=100 --param batch_size=128)
declare -A variants=(
  [default]=""
  [context-1]="--param context_layers=1"
  [context-6]="--param context_layers=6"
  [no-cross-layer-attention]="--param cross_layer_attention=false"
  [no-pattern-memory]="--param memory_slots=0"
  [focal-2]="--param focal_gamma=2.0"
  [default-4x-budget]="--param epochs=4 --param max_steps_per_epoch=200"
)
for name in default context-1 context-6 no-cross-layer-attention no-pattern-memory focal-2 default-4x-budget; do
  if [[ -f $out/$name.json ]]; then continue; fi
  # shellcheck disable=SC2086  # the variant's flags are words
  specmoe train --predictor interlayer --preset baseline --traces "$traces" --out "$out/$name" \
    "${budget[@]}" ${variants[$name]}
  specmoe evaluate --predictor-dir "$out/$name" --traces "$traces" --split val --json "$out/$name.json"
done
