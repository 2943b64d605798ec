#!/usr/bin/env bash
# Every benchmark in sequence (never in parallel on a small machine), results under data/bench/.
# Roughly 40 minutes on 2 CPU cores. Usage: bash bench/run_all.sh [name ...]
set -u
cd "$(dirname "$0")/.."
out=data/bench
mkdir -p "$out"
all="cache_tiny cache_g3 train samples quality peers"
for name in ${@:-$all}; do
  echo "=== $name $(date +%T)"
  case $name in
    cache_tiny) python bench/bench_cache.py --model tiny --layer 1 --tokens 200k --repeats 9 --breakdown --json $out/cache_tiny.json ;;
    cache_g3)   python bench/bench_cache.py --model gemma-3-270m --layer 6 --tokens 25k --repeats 5 --breakdown --json $out/cache_g3.json ;;
    train)      python bench/bench_train.py --steps 20 ;;
    samples)    python bench/bench_samples.py --steps 3 ;;
    quality)    python bench/quality.py --tokens 200k --steps 400 --eval-tokens 4k --out $out/quality ;;
    peers)      python bench/peers/run.py --tokens 51200 --steps 300 --repeats 1 --json $out/peers.json ;;
  esac 2>"$out/$name.stderr" | tee "$out/$name.txt"
done
echo "=== done $(date +%T)"
