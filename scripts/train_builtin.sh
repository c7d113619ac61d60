#!/usr/bin/env bash
# Reproduces the built-in model (models/builtin) and its full-precision twin: fetches and
# prepares the corpus, trains the model on all cores (about two hours on an idle 2-core x86-64
# machine), then the twin the same way (two hours more), exports the model, scores both on the
# held-out texts and counts the known words of 24 samples.
#
# An interrupted run is continued from its last checkpoint when the script is run again; a
# finished one is not trained again.
#
# usage: scripts/train_builtin.sh [WORK_DIR]   (default: target/builtin-run)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=${1:-$repo/target/builtin-run}
mkdir -p "$work"
cd "$repo"
cargo build --release -p bitnet-cli
[[ -d $work/corpus/train ]] || bash scripts/prepare_corpus.sh "$work/corpus"
bitnet=$repo/target/release/bitnet
config=$repo/models/builtin/run/train_config.json

finished() {
    [[ -f $1/summary.json ]] && grep -q '"finished": true' "$1/summary.json"
}

for kind in ternary fp; do
    out=$work/$kind
    finished "$out" && continue
    extra=()
    [[ $kind == fp ]] && extra+=(--full-precision)
    [[ -d $out/checkpoint ]] && extra+=(--resume)
    "$bitnet" train --data "$work"/corpus/train/*.txt --heldout "$work"/corpus/heldout/*.txt \
        --config "$config" --out "$out" --no-progress "${extra[@]}" 2>&1 | tee -a "$work/$kind.log"
done

plays=("$work"/corpus/heldout/shakespeare_*.txt)
books=("$work"/corpus/heldout/bible_*.txt)
"$bitnet" train --out "$work/ternary" --export-only
for kind in ternary fp; do
    "$bitnet" train --out "$work/$kind" --evaluate "${plays[@]}" | tee "$work/$kind-eval-plays.txt"
    "$bitnet" train --out "$work/$kind" --evaluate "${books[@]}" | tee "$work/$kind-eval-bible.txt"
done

# Known words: 24 samples of 150 tokens at temperature 0.8 (the sampler's defaults otherwise).
model=$work/ternary/model-i2_s.gguf
samples=$work/samples
mkdir -p "$samples"
prompts=("ROMEO:" "MACBETH:" "And it came to pass" "HAMLET:" "The LORD said" "First Citizen:")
for seed in $(seq 1 24); do
    prompt=${prompts[$(((seed - 1) % ${#prompts[@]}))]}
    "$bitnet" generate --model "$model" --prompt "$prompt" --max-tokens 150 \
        --temperature 0.8 --seed "$seed" >"$samples/$seed.txt"
done
python3 scripts/known_words.py --corpus "$work/corpus/train" --text "$samples"/*.txt
echo "the built-in model is $model"
