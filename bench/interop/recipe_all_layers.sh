#!/usr/bin/env bash
# docs/circuits.md's recipe end to end: cache every layer of a model in one forward, train a set,
# export it to circuit-tracer, then circuit-tracer's attribution graphs and graph scores for a few
# prompts (in its own venv, made by venvs.py when missing).
#
#   bash bench/interop/recipe_all_layers.sh [WORK]          # WORK defaults to data/recipe-all
#
# Sized by environment variables (defaults: Gemma 3 270M, a laptop-CPU run of about half an hour):
#   MODEL=gemma-3-270m TOKENS=60k SEQ_LEN=256 DICT=2048 K=32 STEPS=300 BATCH=512 LR=3e-3 (the demo's:
#   tc's default 3e-4 left these short runs at 2-4x the FVU, docs/circuits.md)
#   PROMPTS='prompt one|prompt two' (\n in a prompt is a line break)   KEEP_STORE=1 keeps the store
#   (18 layers x 46 KB a token)   MAX_FEATURE_NODES=512 (attribution's cost grows with it)
#   NICE=19 runs every step at that niceness (0 for a machine of your own)
# Each step reruns cheaply on what it finds done (a complete store is not cached again).
# Writes WORK/times.tsv (step, seconds), WORK/fvu.tsv (layer, training FVU, L0, dead fraction),
# WORK/graph/scores.jsonl (one line per prompt) and circuit-tracer's graph files in WORK/graph.
set -euo pipefail
cd "$(dirname "$0")/../.."
work=${1:-data/recipe-all}
model=${MODEL:-gemma-3-270m}
prompts=${PROMPTS:-"The capital of France is|def add(a, b):\n    return|import numpy as"}
py=${PYTHON:-python}
run() { nice -n "${NICE:-19}" "$@"; }
mkdir -p "$work"
times=$work/times.tsv
echo "# $(date -u +%FT%TZ) $*" >>"$times"
step() {   # step NAME COMMAND...: runs it, appends its wall seconds to times.tsv
  local name=$1 start end
  shift
  echo "=== $name: $*" >&2
  start=$(date +%s.%N)
  "$@"
  end=$(date +%s.%N)
  printf '%s\t%.1f\n' "$name" "$(echo "$end - $start" | bc)" | tee -a "$times" >&2
}

step cache run $py -m cli cache --model "$model" --dataset python-docs --layers all \
  --tokens "${TOKENS:-60k}" --seq-len "${SEQ_LEN:-256}" --out "$work/store.zarr"
step train run $py -m cli train --cache "$work/store.zarr" --layers all --dict-size "${DICT:-2048}" \
  --k "${K:-32}" --steps "${STEPS:-300}" --batch-size "${BATCH:-512}" --lr "${LR:-3e-3}" \
  --out "$work/set"
step export run $py -m cli export circuit-tracer --run "$work/set" --out "$work/circuit-tracer" --overwrite

$py - "$work" >"$work/fvu.tsv" <<'EOF'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
print("layer\tfvu\tl0\tdead_fraction\tsteps\ttokens")
for layer in json.loads((work / "set" / "set.json").read_text())["layers"]:
    s = json.loads((work / "set" / f"layer_{layer}" / "summary.json").read_text())
    print(f"{layer}\t{s['fvu']:.4f}\t{s['l0']:.1f}\t{s['dead_fraction']:.4f}\t{s['steps']}\t{s['tokens']}")
EOF
cat "$work/fvu.tsv" >&2

ct_python=$($py bench/interop/venvs.py circuit-tracer | cut -d' ' -f2)
model_folder=$($py -c "import sys; from bench.interop.make_set import model_folder; from pathlib import Path; print(model_folder(sys.argv[1], Path(sys.argv[2])))" "$model" "$work")
prompt_args=()
IFS='|' read -ra list <<<"$prompts"
for p in "${list[@]}"; do prompt_args+=(--prompt "$(printf '%b' "$p")"); done
mkdir -p "$work/graph"
step graphs run "$ct_python" bench/interop/attribution_graph.py --model "$model_folder" \
  --set "$work/circuit-tracer" --out "$work/graph" --max-feature-nodes "${MAX_FEATURE_NODES:-512}" "${prompt_args[@]}" | tee "$work/graph/scores.jsonl"

if [ -z "${KEEP_STORE:-}" ]; then rm -rf "$work/store.zarr"; echo "deleted $work/store.zarr" >&2; fi
echo "done: $work (times.tsv, fvu.tsv, graph/scores.jsonl); view: bash bench/interop/viewer_libs.sh, then $ct_python bench/interop/serve_graph.py --graph $work/graph" >&2
