#!/usr/bin/env bash
# CPU inference speed of `bitnet bench` against llama.cpp (through llama-cpp-python) on
# the same synthetic BitNet b1.58 2B-4T model, written by our CLI as TQ2_0 and TQ1_0 GGUF
# (f16 embedding and tied head), and as TQ2_0 with a Q8_0 or Q6_K embedding and tied head:
# pp128 and tg64 tokens/s at each thread count, side by side, in one run.
#
# usage: scripts/bench_vs_llamacpp.sh [--reps R] [--threads "1 2"] [--keep DIR]
#                                     [--formats "tq2_0 tq1_0 tq2_0-q8head tq2_0-q6khead"]
#                                     [--tg-prefix K] [--dry-run]
#
#   --reps R        timed runs of each phase per engine (default 5, after one warm-up)
#   --threads LIST  thread counts, space-separated (default "1 2")
#   --keep DIR      write the models (about 1.2 GB each) and results.jsonl to DIR and keep
#                   them; models already in DIR are reused. Default: a temporary folder,
#                   removed at exit.
#   --formats LIST  models (default "tq2_0 tq1_0 tq2_0-q8head tq2_0-q6khead"): tq2_0 and
#                   tq1_0 linears with an f16 head, or tq2_0-q8head / tq2_0-q6khead, TQ2_0
#                   linears with a Q8_0 / Q6_K embedding and head (both engines then read the
#                   head's Q8_0 / Q6_K blocks; Q6_K is what llama.cpp's quantizer gives heads)
#   --tg-prefix K   generation runs start with K tokens already in the cache (filled in one
#                   untimed batch by each engine): decoding at context length K (default 0)
#   --dry-run       print the commands instead of running them
#
# Environment:
#   VENV=target/llamacpp-venv     where llama-cpp-python is installed
#   PYTHON=python3                the interpreter that creates the venv
#   LLAMACPP_CMAKE_ARGS=...       replaces the CMake flags below
#   LLAMACPP_FLASH_ATTN=off       llama.cpp flash attention: off (llama-cpp-python's
#                                 default) or on (llama-bench's "auto" picks on for CPU)
#   CARGO=cargo
#   BITNET_ARGS="..."             extra options for our `bitnet bench`, e.g.
#                                 "--weight-layout base3" or "--kv-type f16"
#
# The first run builds llama-cpp-python from its PyPI sdist (pinned in
# scripts/requirements-llamacpp.txt): this compiles llama.cpp and takes several minutes
# (about 5-15 on 2 cores); it needs gcc/g++ (cmake and ninja come from PyPI if absent).
# The flags build the CPU backend only (no CUDA/Metal/Vulkan/BLAS) with -DGGML_NATIVE=ON
# (llama.cpp tuned for this machine: -march=native on x86-64, -mcpu=native on aarch64; set
# explicitly because ggml turns it off when SOURCE_DATE_EPOCH is set). Our build is a
# plain `cargo build --release` that picks its kernels at run time.
#
# Method (see scripts/llamacpp_bench.py and crates/bitnet-inference/src/bench.rs): pp128
# is one batched forward of 128 random token ids from an empty KV cache, logits for the
# last token only; tg64 is 64 single-token steps from an empty cache feeding fixed
# random ids (no sampler); each phase runs R times after one untimed warm-up and the
# median is reported (min/max are in results.jsonl). Each engine loads the model itself
# (llama.cpp by mmap). For each format and thread count the two engines run one after
# the other, never at once, and which runs first alternates to spread slow drift
# (thermal, page cache) over both. Run it on an otherwise idle machine.
#
# Two differences in the work done, both small: llama.cpp's `bitnet` graph uses SiLU in
# the FFN where the 2B-4T model (and our run) uses ReLU^2, and flash attention is off on
# the llama.cpp side unless LLAMACPP_FLASH_ATTN=on. Ratios are ours / llama.cpp (above 1:
# ours is faster).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

reps=5
threads_list="1 2"
keep=""
formats="tq2_0 tq1_0 tq2_0-q8head tq2_0-q6khead"
dry_run=0
tg_prefix=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --reps) reps=${2:?--reps needs a value}; shift 2 ;;
        --threads) threads_list=${2:?--threads needs a value}; shift 2 ;;
        --keep) keep=${2:?--keep needs a folder}; shift 2 ;;
        --formats) formats=${2:?--formats needs a value}; shift 2 ;;
        --tg-prefix) tg_prefix=${2:?--tg-prefix needs a value}; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ "$reps" =~ ^[1-9][0-9]*$ ]] || { echo "error: --reps must be a positive integer" >&2; exit 2; }
for t in $threads_list; do
    [[ "$t" =~ ^[1-9][0-9]*$ ]] || { echo "error: bad thread count: $t" >&2; exit 2; }
done
for f in $formats; do
    [[ "$f" == tq2_0 || "$f" == tq1_0 || "$f" == tq2_0-q8head || "$f" == tq2_0-q6khead ]] ||
        { echo "error: format must be tq2_0, tq1_0, tq2_0-q8head or tq2_0-q6khead: $f" >&2
          exit 2; }
done

venv=${VENV:-target/llamacpp-venv}
python=${PYTHON:-python3}
cargo=${CARGO:-cargo}
flash_attn=${LLAMACPP_FLASH_ATTN:-off}
reqs=scripts/requirements-llamacpp.txt
bitnet=target/release/bitnet
vpy=$venv/bin/python
prompt=128
gen=64
cmake_args=${LLAMACPP_CMAKE_ARGS:-"-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_HIP=OFF -DGGML_SYCL=OFF -DGGML_OPENCL=OFF -DGGML_BLAS=OFF -DGGML_RPC=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"}
want_version=$(sed -n 's/^llama-cpp-python==\([^ #]*\).*/\1/p' "$reqs")
[[ -n "$want_version" ]] || { echo "error: no llama-cpp-python pin in $reqs" >&2; exit 2; }

# Runs "$@", or prints it under --dry-run.
run() {
    if [[ $dry_run == 1 ]]; then
        printf '+'; printf ' %q' "$@"; printf '\n'
    else
        "$@"
    fi
}
say() { echo "== $*" >&2; }

# --- machine ------------------------------------------------------------------------
cpu_model=$(sed -n 's/^model name[[:space:]]*:[[:space:]]*//p' /proc/cpuinfo 2>/dev/null | head -n1)
if [[ -z "$cpu_model" ]] && command -v lscpu >/dev/null; then
    cpu_model=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -n1)
fi
cpu_flags=$(grep -m1 -E '^(flags|Features)[[:space:]]*:' /proc/cpuinfo 2>/dev/null | cut -d: -f2- || true)
have_flags=()
for f in avx2 avx512f avx512_vnni avx_vnni amx_int8 asimd asimddp i8mm sve sve2; do
    [[ " $cpu_flags " == *" $f "* ]] && have_flags+=("$f")
done
logical=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)
physical=""
if command -v lscpu >/dev/null; then
    physical=$(lscpu -p=core,socket 2>/dev/null | grep -v '^#' | sort -u | wc -l || true)
fi
machine_line="CPU: ${cpu_model:-unknown} ($(uname -m)); ${physical:-?} cores, $logical logical CPUs; flags: ${have_flags[*]:-none of avx2 avx512f avx512_vnni avx_vnni amx_int8 / asimddp i8mm sve}"
say "$machine_line"

# --- llama-cpp-python ---------------------------------------------------------------
have_version=""
if [[ -x "$vpy" ]]; then
    have_version=$("$vpy" -c 'import llama_cpp; print(llama_cpp.__version__)' 2>/dev/null || true)
fi
if [[ "$have_version" != "$want_version" ]]; then
    say "building llama-cpp-python $want_version from source into $venv (compiles llama.cpp: several minutes)"
    [[ -x "$vpy" ]] || run "$python" -m venv "$venv"
    run env CMAKE_ARGS="$cmake_args" FORCE_CMAKE=1 \
        CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$logical}" \
        "$vpy" -m pip install --disable-pip-version-check --no-cache-dir \
        --no-binary llama-cpp-python -r "$reqs"
    if [[ $dry_run == 0 ]]; then
        have_version=$("$vpy" -c 'import llama_cpp; print(llama_cpp.__version__)')
    fi
fi
say "llama-cpp-python ${have_version:-$want_version} ($venv)"

# --- our CLI ------------------------------------------------------------------------
say "building bitnet-cli"
run "$cargo" build --release -p bitnet-cli

# --- models -------------------------------------------------------------------------
if [[ -n "$keep" ]]; then
    dir=$keep
    run mkdir -p "$dir"
else
    if [[ $dry_run == 1 ]]; then
        dir=${TMPDIR:-/tmp}/bitnet-vs-llamacpp.XXXXXX
    else
        dir=$(mktemp -d "${TMPDIR:-/tmp}/bitnet-vs-llamacpp.XXXXXX")
        trap 'rm -rf "$dir"' EXIT
    fi
fi
results=$dir/results.jsonl
[[ $dry_run == 1 ]] || : >"$results"
# Writes the synthetic model of format $1 unless DIR already has it.
make_model() {
    local f=$1 model=$dir/s2b-$1.gguf
    if [[ -s "$model" ]]; then
        say "reusing $model"
    elif [[ "$f" == tq2_0-q8head || "$f" == tq2_0-q6khead ]]; then
        local head=q8_0
        [[ "$f" == tq2_0-q6khead ]] && head=q6_k
        make_model tq2_0
        say "writing $model (the TQ2_0 model with its embedding and head as ${head^^})"
        run "$bitnet" convert --model "$dir/s2b-tq2_0.gguf" --type tq2_0 --embedding-type $head \
            --out "$model"
    else
        say "writing $model (synthetic 2B-4T, about 1.2 GB)"
        run "$bitnet" synth --shape 2b4t --type "$f" --out "$model"
    fi
}
for f in $formats; do
    make_model "$f"
done

# --- benchmarks ---------------------------------------------------------------------
ours() {
    # shellcheck disable=SC2086 # BITNET_ARGS is a list of options, split on purpose
    run "$bitnet" bench --model "$1" -p "$prompt" -n "$gen" --reps "$reps" --threads "$2" \
        --tg-prefix "$tg_prefix" --json ${BITNET_ARGS:-}
}
theirs() {
    run "$vpy" scripts/llamacpp_bench.py --model "$1" --threads "$2" -p "$prompt" -n "$gen" \
        --reps "$reps" --flash-attn "$flash_attn" --tg-prefix "$tg_prefix"
}
# Runs one engine and appends its JSON line, tagged with the format, to results.jsonl.
record() {
    local engine=$1 f=$2 t=$3 model=$4 out line
    say "$engine: $f, $t thread(s)"
    if [[ $dry_run == 1 ]]; then
        "$engine" "$model" "$t"
        return
    fi
    out=$("$engine" "$model" "$t")
    line=$(printf '%s\n' "$out" | grep '^{' | tail -n1 || true)
    [[ -n "$line" ]] || { echo "error: $engine printed no JSON line: $out" >&2; exit 1; }
    printf '{"side":"%s","format":"%s","threads_asked":%s,"result":%s}\n' \
        "$engine" "$f" "$t" "$line" >>"$results"
}
i=0
for f in $formats; do
    model=$dir/s2b-$f.gguf
    for t in $threads_list; do
        if (( i % 2 == 0 )); then
            record ours "$f" "$t" "$model"; record theirs "$f" "$t" "$model"
        else
            record theirs "$f" "$t" "$model"; record ours "$f" "$t" "$model"
        fi
        i=$((i + 1))
    done
done
[[ $dry_run == 1 ]] && exit 0

# --- table --------------------------------------------------------------------------
echo
echo "$machine_line"
"$python" - "$results" "$reps" <<'EOF'
import json, sys

rows = {}
meta = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    key = (r["format"], r["threads_asked"])
    rows.setdefault(key, {})[r["side"]] = r["result"]
    if r["side"] == "theirs":
        meta["llama"] = r["result"].get("llama_cpp_version")
        meta["fa"] = r["result"].get("flash_attn")
    else:
        meta["kernels"] = r["result"].get("kernels")
        meta["weight_layout"] = r["result"].get("weight_layout")

def num(x):
    return "n/a" if x is None else f"{x:.2f}"

def ratio(a, b):
    return "n/a" if not a or not b else f"{a / b:.2f}x"

print(f"ours: bitnet bench (kernels: {meta.get('kernels')}, "
      f"weights: {meta.get('weight_layout')}); "
      f"llama.cpp: {meta.get('llama')} (flash attention {meta.get('fa')}); "
      f"medians of {sys.argv[2]} runs, tokens/s; ratio = ours / llama.cpp")
print()
print("| format | threads | ours pp128 | llama.cpp pp128 | ratio | ours tg64 | llama.cpp tg64 | ratio |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for (fmt, t), sides in rows.items():
    o, l = sides.get("ours", {}), sides.get("theirs", {})
    for name, side in (("ours", o), ("llama.cpp", l)):
        if side.get("threads") not in (None, t):
            print(f"warning: {name} ran {side.get('threads')} threads, asked {t}", file=sys.stderr)
    op, lp = o.get("pp_tokens_per_s"), l.get("pp_tokens_per_s")
    ot, lt = o.get("tg_tokens_per_s"), l.get("tg_tokens_per_s")
    label = {"tq2_0-q8head": "TQ2_0, Q8_0 head",
             "tq2_0-q6khead": "TQ2_0, Q6_K head"}.get(fmt, fmt.upper())
    print(f"| {label} | {t} | {num(op)} | {num(lp)} | {ratio(op, lp)} "
          f"| {num(ot)} | {num(lt)} | {ratio(ot, lt)} |")
EOF
if [[ -n "$keep" ]]; then
    echo
    echo "raw results (with min/max): $results"
fi
