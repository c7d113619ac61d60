#!/usr/bin/env bash
# Reproduces the built-in model (models/builtin) and its full-precision twin: fetches and
# prepares the corpus, then trains both, one core each, side by side (about 80 minutes on an
# idle 2-core x86-64 machine), and exports the b1.58 model.
#
# usage: scripts/train_builtin.sh [WORK_DIR]   (default: target/builtin-run)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=${1:-$repo/target/builtin-run}
mkdir -p "$work"
cd "$repo"
cargo build --release -p bitnet-cli
bash scripts/prepare_corpus.sh "$work/corpus"
bitnet=$repo/target/release/bitnet
config=$repo/models/builtin/run/train_config.json
for kind in ternary fp; do
    extra=()
    [[ $kind == fp ]] && extra=(--full-precision)
    RAYON_NUM_THREADS=1 "$bitnet" train --data "$work"/corpus/train/*.txt \
        --heldout "$work"/corpus/heldout/*.txt --config "$config" --out "$work/$kind" \
        --threads 1 --no-progress "${extra[@]}" >"$work/$kind.log" 2>&1 &
done
wait
plays=("$work"/corpus/heldout/shakespeare_*.txt)
for kind in ternary fp; do
    "$bitnet" train --out "$work/$kind" --export-only
    "$bitnet" train --out "$work/$kind" --evaluate "${plays[@]}" --threads 1
done
echo "the built-in model is $work/ternary/model-i2_s.gguf"
