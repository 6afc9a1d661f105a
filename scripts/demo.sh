#!/usr/bin/env bash
# `make demo`: the main jobs on the shipped fixtures — validate a good and a broken tree, convert to every
# format and back, verify, show info and the statistics.  Usage: scripts/demo.sh BIN_DIR OUT_DIR
set -euo pipefail
BIN=${1:-.venv/bin}
OUT=${2:-demo-out}
ACTFMT="$BIN/actfmt"
GOOD=fixtures/valid/real_minilm_bf16_slice/Activations
BROKEN=fixtures/invalid/ACT302_missing_middle_shard

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

rm -rf "$OUT"
mkdir -p "$OUT"

step actfmt validate "$GOOD"
"$ACTFMT" validate "$GOOD"

step actfmt validate "$BROKEN"
# A broken tree exits 1: that is the point of the demo, so do not stop here.
"$ACTFMT" validate "$BROKEN" || echo "(exit status $? — errors found, as expected)"

# every registered format but the producer's own (a new format joins the demo by itself)
FORMATS=$("$BIN/python" -c "from actfmt.formats import FORMATS; print(' '.join(f for f in FORMATS if f != 'pt'))")
STORES=()
for fmt in $FORMATS; do
  STORES+=("$OUT/$fmt")
  step actfmt convert "$GOOD" "$OUT/$fmt" --to "$fmt"
  "$ACTFMT" convert "$GOOD" "$OUT/$fmt" --to "$fmt"
  step actfmt convert "$OUT/$fmt" "$OUT/back-from-$fmt" --to pt
  "$ACTFMT" convert "$OUT/$fmt" "$OUT/back-from-$fmt" --to pt
  step actfmt verify "$GOOD" "$OUT/back-from-$fmt"
  "$ACTFMT" verify "$GOOD" "$OUT/back-from-$fmt"
done

step actfmt info "$OUT/zarr"
"$ACTFMT" info "$OUT/zarr"
step actfmt info "$OUT/hdf5"
"$ACTFMT" info "$OUT/hdf5"

# The researcher's headline: per-layer figures, and where EM and Neutral separate (kept by convert: instant).
step actfmt stats "$OUT/zarr"
"$ACTFMT" stats "$OUT/zarr"
if "$BIN/python" -c "import matplotlib" 2>/dev/null; then
  step actfmt stats "$GOOD" --plot "$OUT/stats.png" -q
  "$ACTFMT" stats "$GOOD" --plot "$OUT/stats.png" -q >/dev/null
  echo "figure written to $OUT/stats.png"
fi

step actfmt validate "${STORES[@]}"
"$ACTFMT" validate "${STORES[@]}"

step "python: read a layer, random rows and one example through actfmt.open"
"$BIN/python" - "$OUT/zarr" <<'PY'
import sys
import actfmt

for key, split in sorted(actfmt.open_tree(sys.argv[1]).items()):
    with split:
        layer = split.layer(2)
        print(f"{'/'.join(key)}: {split.format}, {split.num_layers} layers, {split.num_examples} examples, "
              f"dtype {split.dtype}; layer_02 {tuple(layer[:].shape)}, rows [5, 1, 5] -> "
              f"{tuple(layer[[5, 1, 5]].shape)}, example(0) -> {tuple(split.example(0).shape)}")
PY
printf '\nDemo outputs are in %s/\n' "$OUT"
