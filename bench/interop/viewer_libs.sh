#!/usr/bin/env bash
# Fetches, from the npm registry, the browser libraries circuit-tracer's graph viewer loads from other
# hosts, into a cache outside the repo (serve_graph.py --libs serves them in place of the remote URLs).
#   bash bench/interop/viewer_libs.sh [DIR]     (default ~/.cache/tc-peers/viewer-libs)
# unpkg.com serves npm packages, so dagre@0.8.5 and pako@2.1.0 are the exact files the page names;
# d3@7.9.2 for the page's d3.js (its code uses v6+/v7 APIs: d3.pointer, d3.group, d3.sort, handlers
# called with the event first); d3-jetpack@2.3.0 plus viewer_shim.js for jetpack_2024-07-20.js.
# (d3-jetpack's own d3v7+jetpack.js bundle is not used: it carries two copies of d3-selection and
# extends the one d3.select does not return.)
set -euo pipefail
dir="${1:-$HOME/.cache/tc-peers/viewer-libs}"
mkdir -p "$dir"
cd "$dir"
[ -f package.json ] || echo '{"private": true}' > package.json
npm install --no-audit --no-fund --save-exact d3@7.9.2 d3-jetpack@2.3.0 dagre@0.8.5 pako@2.1.0
for f in d3/dist/d3.min.js d3-jetpack/build/d3-jetpack.cjs dagre/dist/dagre.min.js pako/dist/pako.min.js; do
  test -s "node_modules/$f" || { echo "viewer_libs: node_modules/$f missing after npm install" >&2; exit 1; }
done
echo "viewer libs in $dir"
