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
# steps (Rust: "step_seconds_median" of OUT/summary.json); the Rust mean over all of
# its steps, the first ones included ("tokens_per_s"), is printed beside it.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

config=${1:-}
steps=${2:-20}
threads=${THREADS:-2}
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
rust_json=""
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
        rust_out=$work/rust_run
        echo "== rust: bitnet train --steps $steps --threads $threads"
        if target/release/bitnet train --data "$data" --config "$config" --steps "$steps" \
            --out "$rust_out" --threads "$threads"; then
            if [[ -f "$rust_out/summary.json" ]]; then
                rust_json=$(cat "$rust_out/summary.json")
                rust_status="ok"
            else
                rust_status="no summary.json"
            fi
        else
            rust_status="bitnet train failed"
        fi
    else
        rust_status="build failed"
    fi
fi

# --- PyTorch side ---------------------------------------------------------------
echo "== pytorch: torch_train_bench.py --steps $steps --threads $threads"
torch_log=$work/torch.out
"$py" scripts/torch_train_bench.py --config "$config" --steps "$steps" \
    --threads "$threads" --warmup-steps "$warmup" | tee "$torch_log"
torch_json=$(grep '^{' "$torch_log" | tail -n 1)

# --- Table ------------------------------------------------------------------------
python3 - "$rust_status" "$rust_json" "$torch_json" <<'EOF'
import json, sys
rust_status, rust_raw, torch_raw = sys.argv[1:4]
torch = json.loads(torch_raw)
rust = json.loads(rust_raw) if rust_raw else None
rows = []
rust_tps = None
if rust is not None:
    median = float(rust.get("step_seconds_median", 0.0))
    per_step = rust["tokens"] / max(rust["steps"], 1)
    rust_tps = per_step / median if median > 0 else float(rust["tokens_per_s"])
    rows.append(("rust (bitnet)", rust.get("threads", "?"), rust_tps))
else:
    rows.append((f"rust (bitnet): {rust_status}", "-", None))
rows.append((f"pytorch {torch.get('torch_version', '')}".strip(), torch["threads"],
             float(torch["tokens_per_s"])))
print()
print(f"{'engine':34s} {'threads':>7s} {'tokens/s':>12s}")
for name, thr, tps in rows:
    print(f"{name:34s} {str(thr):>7s} {('%.1f' % tps) if tps else 'n/a':>12s}")
if rust_tps is not None and torch["tokens_per_s"] > 0:
    print(f"ratio rust/torch: {rust_tps / torch['tokens_per_s']:.3f}")
    print(f"(rust mean over all its steps, warm-up included: {float(rust['tokens_per_s']):.1f})")
else:
    print("ratio rust/torch: n/a")
print(f"(both: median step after warm-up; torch left out {torch.get('warmup_steps', '?')} "
      "steps, rust 3)")
EOF

if [[ "${SKIP_RUST:-0}" != 1 && "$rust_status" != ok ]]; then
    echo "rust side did not produce a result: $rust_status" >&2
    exit 1
fi
