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

echo "== 4. train: configs/demo.toml (a small CNN, CosFace, q = 0.1 masked faces) on the CPU, verified at the end"
rm -rf "$out/train"
train_start=$(date +%s)
facetool train configs/demo.toml --output "$out/train" \
  --set data.shards="$out/shards" --set "eval.bins=[\"$out/data/synth.bin\", \"$out/data/synth_masked.bin\"]"
echo "train: $(( $(date +%s) - train_start )) s"

echo "== 5. bench verification: the exported backbone on the held-out pairs, holistic and masked, with a ROC plot"
facetool bench verification "$out/train/backbone.pt" --bin "$out/data/synth.bin" --bin "$out/data/synth_masked.bin" \
  --json "$out/verification.json" --plot "$out/roc.png" --quiet

echo "== summary"
facetool inspect "$out/data" "$out/data/synth.bin" "$out/data/synth_masked.bin" "$out/shards"
python - "$out" "$start" <<'PY'
import json, sys, time
out, start = sys.argv[1], int(sys.argv[2])
b = json.load(open(f"{out}/bench-convert.json"))
m = json.load(open(f"{out}/shards/manifest.json"))
print(f"shards: {len(m['shards'])} with {m['samples']} samples, {m['masked']} with a masked twin, {m['skipped']} skipped (manifest: {out}/shards/manifest.json)")
print(f"convert: {b['records_per_s']:,.0f} records/s = {b['ratio_to_copy']:.2f}x a plain copy ({b['copy_records_per_s']:,.0f} records/s)")
t = json.load(open(f"{out}/train/summary.json"))
v = json.load(open(f"{out}/verification.json"))["sets"]
print(f"train: {t['steps']} steps at {t['images_per_s']:,.0f} images/s; checkpoints in {out}/train/checkpoints, summary {out}/train/summary.json")
print(f"verification (held-out identities): synth {100 * v['synth']['accuracy']:.2f}%, masked {100 * v['synth_masked']['accuracy']:.2f}% (ROC: {out}/roc.png)")
print(f"demo finished in {time.time() - start:.0f} s; outputs in {out}/")
PY
