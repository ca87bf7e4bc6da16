#!/usr/bin/env bash
# The main job on the built-in synthetic dataset; `make demo` runs it inside the project's .venv.
# Each stage skips work that is already done (synth output present, convert resumes), so a re-run is quick.
set -euo pipefail
out="${1:-demo-output}"
mkdir -p "$out"
start=$(date +%s)

echo "== 1. synth: procedurally drawn faces in InsightFace layout A, plus a held-out verification set"
if [ ! -f "$out/data/train.rec" ]; then
  facetool synth "$out/data" --identities 200 --images-per-identity 40 --pairs 1000 --seed 0 --workers 2
else
  echo "(kept $out/data)"
fi

echo "== 2. convert: RecordIO -> shuffled WebDataset shards with DALI indexes, a quarter with a masked twin"
if [ -f "$out/shards/manifest.json" ] && ! grep -q '"mask_fraction": 0.25' "$out/shards/manifest.json"; then
  rm -rf "$out/shards"  # made by an older demo with other arguments
fi
facetool convert "$out/data" "$out/shards" --samples-per-shard 2000 --workers 2 --mask-fraction 0.25

echo "== 2b. masks: a masked copy of the verification set (second image of each pair) and a preview sheet"
facetool masks bin "$out/data/synth.bin" "$out/data/synth_masked.bin" --mode one --quiet
facetool masks preview "$out/masks-preview.png" --count 6

echo "== 3. bench convert: convert speed against a plain copy of the same bytes"
facetool bench convert "$out/data" --workers 2 --samples-per-shard 2000 --json "$out/bench-convert.json"

echo "== summary"
facetool inspect "$out/data" "$out/data/synth.bin" "$out/data/synth_masked.bin" "$out/shards"
python - "$out" "$start" <<'PY'
import json, sys, time
out, start = sys.argv[1], int(sys.argv[2])
b = json.load(open(f"{out}/bench-convert.json"))
m = json.load(open(f"{out}/shards/manifest.json"))
print(f"shards: {len(m['shards'])} with {m['samples']} samples, {m['masked']} with a masked twin, {m['skipped']} skipped (manifest: {out}/shards/manifest.json)")
print(f"convert: {b['records_per_s']:,.0f} records/s = {b['ratio_to_copy']:.2f}x a plain copy ({b['copy_records_per_s']:,.0f} records/s)")
print(f"demo finished in {time.time() - start:.0f} s; outputs in {out}/")
PY
