#!/usr/bin/env bash
# Every benchmark in sequence (never in parallel on a small machine), results under data/bench/.
# Roughly 40 minutes on 2 CPU cores. Usage: bash bench/run_all.sh [name ...]
set -u
cd "$(dirname "$0")/.."
out=data/bench
mkdir -p "$out"
all="cache_tiny cache_g3 train samples quality peers outliers dead_latents transcoders eval interop"
demo_store=data/demo/gemma-3-270m_l6.zarr              # made by `tc demo`
licences=data/bench/g3-l6-licenses.zarr                # another text, for held-out rows
held_out() {   # the licence texts of /usr/share/common-licenses as .txt files, cached once
  [ -d "$licences" ] && return
  mkdir -p data/bench/licenses-text
  for f in /usr/share/common-licenses/*; do [ -f "$f" ] && cp "$f" "data/bench/licenses-text/$(basename "$f").txt"; done
  tc cache --model gemma-3-270m --layer 6 --dataset data/bench/licenses-text --tokens 40k --seq-len 256 --out "$licences"
}
for name in ${@:-$all}; do
  echo "=== $name $(date +%T)"
  case $name in
    cache_tiny) python bench/bench_cache.py --model tiny --layer 1 --tokens 200k --repeats 9 --breakdown --json $out/cache_tiny.json ;;
    cache_g3)   python bench/bench_cache.py --model gemma-3-270m --layer 6 --tokens 25k --repeats 5 --breakdown --json $out/cache_g3.json ;;
    train)      python bench/bench_train.py --steps 20 ;;
    samples)    python bench/bench_samples.py --steps 3 ;;
    quality)    python bench/quality.py --tokens 200k --steps 400 --eval-tokens 4k --out $out/quality ;;
    peers)      python bench/peers/run.py --tokens 51200 --steps 300 --repeats 1 --json $out/peers.json ;;
    outliers)   python bench/outliers.py $demo_store --json $out/outliers.json ;;
    dead_latents) held_out && python bench/dead_latents.py --train-store $demo_store --held-out-store $licences ;;
    transcoders) held_out && python bench/peers/transcoders.py --train-store $demo_store --heldout-store $licences \
                   --steps 300 --json $out/transcoders.json ;;
    eval)       python bench/bench_eval.py --run data/demo/run --repeats 2 --threads 1 --json $out/eval.json
                python bench/bench_eval.py --run data/demo/run --rows --repeats 2 --threads 1 --json $out/eval_rows.json ;;
    interop)    python bench/interop/compare.py --run data/demo/run --rows 4096 --json $out/interop.json \
                  && python bench/interop/make_set.py --model tiny --work $out/interop-tiny \
                  && "$(python bench/interop/venvs.py circuit-tracer | cut -d' ' -f2)" bench/interop/attribution_graph.py \
                       --model $out/interop-tiny/model --set $out/interop-tiny/set --out $out/interop-tiny/graph ;;
  esac 2>"$out/$name.stderr" | tee "$out/$name.txt"
done
echo "=== done $(date +%T)"
