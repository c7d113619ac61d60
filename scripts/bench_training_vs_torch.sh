#!/usr/bin/env bash
# Training speed of the Rust trainer (`bitnet train`) against the same BitNet b1.58
# model in eager PyTorch on the CPU (scripts/torch_train_bench.py), same config,
# steps and thread count, run one after the other (not concurrently).
#
# usage: scripts/bench_training_vs_torch.sh [CONFIG.json] [STEPS]
#
#   CONFIG   TrainConfig JSON ({"model": ..., "recipe": ...}); default: the
#            256-wide, 4-layer config below.
#   STEPS    optimizer steps per engine (default 20).
#
# Environment:
#   THREADS=2            threads for each engine
#   ROUNDS=5             rounds; each runs Rust then PyTorch, and the table gives every
#                        round's ratio and their median
#   DATA=FILE            training text for `bitnet train` (default: a generated
#                        random-word corpus; the torch side uses random tokens)
#   WARMUP_STEPS=3       leading torch steps left out of its median (`bitnet train`
#                        leaves out 3 of its own: keep this at 3 to compare alike)
#   SKIP_RUST=1          only run the PyTorch side
#   VENV=target/torch-venv
#   TORCH_INDEX_URL=URL  optional pip index for torch (e.g. a CPU-only wheel
#                        index); default: PyPI (its wheel pulls CUDA runtime wheels,
#                        several GB, unused here)
#
# Both engines' tokens/s are batch_size*seq_len / median step time after the warm-up
# steps (Rust: "step_seconds_median" of OUT/summary.json), per round; the ratio quoted is
# the median of the rounds' ratios.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

config=${1:-}
steps=${2:-20}
threads=${THREADS:-2}
rounds=${ROUNDS:-5}
warmup=${WARMUP_STEPS:-3}
venv=${VENV:-target/torch-venv}
reqs=scripts/requirements-torch.txt

work=$(mktemp -d "${TMPDIR:-/tmp}/bitnet-train-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT

if [[ -z "$config" ]]; then
    config=$work/config.json
    cat >"$config" <<'EOF'
{"model": {"hidden_size": 256, "intermediate_size": 768, "num_layers": 4, "num_heads": 8,
           "num_kv_heads": 4, "vocab_size": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "tie_word_embeddings": true},
 "recipe": {"steps": 6000, "batch_size": 16, "seq_len": 256, "lr": 0.003, "warmup_steps": 200,
            "lr_stage1_end": 0.5, "lr_stage2_start": 0.25, "lr_final": 0.0, "weight_decay": 0.1,
            "beta1": 0.9, "beta2": 0.95, "adam_eps": 1e-8, "grad_clip": 1.0,
            "schedule": "two_stage", "quantize": true, "seed": 1234, "eval_every": 250,
            "eval_windows": 32, "checkpoint_every": 500}}
EOF
fi
[[ -f "$config" ]] || { echo "error: config not found: $config" >&2; exit 2; }

# --- PyTorch environment ------------------------------------------------------
py=$venv/bin/python
want_torch=$(sed -n 's/^torch==\([^ #]*\).*/\1/p' "$reqs")
have_torch=""
if [[ -x "$py" ]]; then
    have_torch=$("$py" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
fi
if [[ -z "$have_torch" || "${have_torch%%+*}" != "$want_torch" ]]; then
    echo "== installing PyTorch $want_torch into $venv (large download)"
    [[ -x "$py" ]] || python3 -m venv "$venv"
    pip_args=(install --disable-pip-version-check -r "$reqs")
    if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
        pip_args+=(--index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple)
    fi
    "$py" -m pip "${pip_args[@]}"
    have_torch=$("$py" -c 'import torch; print(torch.__version__)')
fi
echo "== torch $have_torch ($venv)"

# --- Rust side ------------------------------------------------------------------
rust_status="skipped"
if [[ "${SKIP_RUST:-0}" != 1 ]]; then
    data=${DATA:-}
    if [[ -z "$data" ]]; then
        data=$work/random_corpus.txt
        # Deterministic random-word text (~1 MB), so the tokenizer has something to learn.
        python3 - "$data" <<'EOF'
import random, sys
rng = random.Random(1234)
letters = "etaoinshrdlcumwfgypbvkjxqz"
weights = [26 - i for i in range(26)]
words = ["".join(rng.choices(letters, weights, k=rng.randint(1, 9))) for _ in range(3000)]
out = []
size = 0
while size < 1_000_000:
    line = " ".join(rng.choices(words, k=rng.randint(4, 14)))
    line = line[0].upper() + line[1:] + rng.choice(".,;!?") + "\n"
    out.append(line)
    size += len(line)
with open(sys.argv[1], "w", encoding="utf-8", newline="\n") as fh:
    fh.writelines(out)
EOF
    fi
    echo "== building bitnet-cli (release)"
    if cargo build --release -p bitnet-cli; then
        rust_status="ok"
    else
        rust_status="build failed"
    fi
fi

# --- Rounds: the two engines one after the other, `rounds` times ---------------------
# This machine class is shared and its speed drifts by tens of percent within minutes;
# alternating the engines and taking medians keeps a slow phase from landing on one side.
results=$work/results.jsonl
: >"$results"
for round in $(seq "$rounds"); do
    if [[ "$rust_status" == ok ]]; then
        rust_out=$work/rust_run_$round
        echo "== round $round/$rounds, rust: bitnet train --steps $steps --threads $threads"
        if target/release/bitnet train --data "$data" --config "$config" --steps "$steps" \
            --out "$rust_out" --threads "$threads" && [[ -f "$rust_out/summary.json" ]]; then
            python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d["engine"]="rust"; d["round"]=int(sys.argv[2]); print(json.dumps(d))' \
                "$rust_out/summary.json" "$round" >>"$results"
        else
            rust_status="bitnet train failed (round $round)"
        fi
    fi
    echo "== round $round/$rounds, pytorch: torch_train_bench.py --steps $steps --threads $threads"
    torch_log=$work/torch_$round.out
    "$py" scripts/torch_train_bench.py --config "$config" --steps "$steps" \
        --threads "$threads" --warmup-steps "$warmup" | tee "$torch_log"
    grep '^{' "$torch_log" | tail -n 1 |
        python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); d["round"]=int(sys.argv[1]); print(json.dumps(d))' "$round" >>"$results"
done

# --- Table ------------------------------------------------------------------------
python3 - "$rust_status" "$results" <<'EOF'
import json, statistics, sys
rust_status, path = sys.argv[1:3]
runs = [json.loads(line) for line in open(path) if line.strip()]
rust = {r["round"]: r for r in runs if r.get("engine") == "rust"}
torch = {r["round"]: r for r in runs if r.get("engine") == "pytorch"}

def rust_tps(r):
    # Median step after Rust's own 3 warm-up steps, as torch's figure is.
    median = float(r.get("step_seconds_median", 0.0))
    per_step = r["tokens"] / max(r["steps"], 1)
    return per_step / median if median > 0 else float(r["tokens_per_s"])

first = next(iter(torch.values()), {})
print()
print(f"{'round':>5s} {'rust tokens/s':>14s} {'torch tokens/s':>15s} {'ratio':>7s}")
ratios = []
for rnd in sorted(torch):
    t = float(torch[rnd]["tokens_per_s"])
    r = rust_tps(rust[rnd]) if rnd in rust else None
    ratio = r / t if r and t > 0 else None
    if ratio:
        ratios.append(ratio)
    print(f"{rnd:>5d} {('%.1f' % r) if r else 'n/a':>14s} {t:>15.1f} "
          f"{('%.3f' % ratio) if ratio else 'n/a':>7s}")
threads = first.get("threads", "?")
print()
print(f"{'engine':34s} {'threads':>7s} {'tokens/s':>12s}  (median of rounds)")
if rust:
    rust_median = statistics.median(rust_tps(r) for r in rust.values())
    print(f"{'rust (bitnet)':34s} {str(threads):>7s} {rust_median:>12.1f}")
else:
    print(f"rust (bitnet): {rust_status}")
torch_median = statistics.median(float(t["tokens_per_s"]) for t in torch.values())
name = f"pytorch {first.get('torch_version', '')}".strip()
print(f"{name:34s} {str(threads):>7s} {torch_median:>12.1f}")
if ratios:
    print(f"ratio rust/torch: {statistics.median(ratios):.3f} (median of {len(ratios)} rounds' "
          f"ratios; min {min(ratios):.3f}, max {max(ratios):.3f})")
else:
    print("ratio rust/torch: n/a")
print(f"(each run: median step after warm-up; torch left out "
      f"{first.get('warmup_steps', '?')} steps, rust 3)")
EOF

if [[ "${SKIP_RUST:-0}" != 1 && "$rust_status" != ok ]]; then
    echo "rust side did not produce a result: $rust_status" >&2
    exit 1
fi
