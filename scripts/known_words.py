#!/usr/bin/env python3
"""Share of the words of a generated text that occur in the training text.

Words are maximal runs of letters (with inner apostrophes), compared case-insensitively.
Usage: known_words.py --corpus DIR_OR_FILES... --text GENERATED.txt
"""
import argparse
import pathlib
import re
import sys

WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")


def words(text):
    return [w.lower() for w in WORD.findall(text)]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--corpus", nargs="+", required=True, help="training files or folders")
    ap.add_argument("--text", nargs="+", required=True, help="generated text files")
    a = ap.parse_args()
    vocab = set()
    for c in a.corpus:
        p = pathlib.Path(c)
        files = sorted(p.glob("*.txt")) if p.is_dir() else [p]
        for f in files:
            vocab.update(words(f.read_text(encoding="utf-8")))
    total = known = 0
    unknown = {}
    for t in a.text:
        for w in words(pathlib.Path(t).read_text(encoding="utf-8")):
            total += 1
            if w in vocab:
                known += 1
            else:
                unknown[w] = unknown.get(w, 0) + 1
    if total == 0:
        sys.exit("no words in the generated text")
    print(f"{known}/{total} words known ({100.0 * known / total:.1f}%), vocabulary {len(vocab)}")
    top = sorted(unknown.items(), key=lambda kv: -kv[1])[:20]
    print("unknown:", ", ".join(f"{w} x{n}" for w, n in top))


if __name__ == "__main__":
    main()
