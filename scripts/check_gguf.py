#!/usr/bin/env python3
"""Open a GGUF file with the reference reader (PyPI `gguf`, llama.cpp's gguf-py) and list it.

Prints every metadata key (type and a short rendering of the value) and every tensor (name,
ggml type name, shape in ggml order ne0 first, byte count, offset), then checks the
expectations given on the command line. Exits 0 if the file opened and all expectations
hold, 1 if an expectation failed, 2 if the reader refused the file.

    python3 -m venv /tmp/ggufenv
    /tmp/ggufenv/bin/pip install -r scripts/requirements-gguf.txt
    /tmp/ggufenv/bin/python scripts/check_gguf.py model.gguf --expect-arch bitnet --expect-tensors 24

Note: gguf-py knows no ggml type 36 (bitnet.cpp's I2_S; the id is a retired one upstream),
so it refuses any file holding an I2_S tensor; the script says so when that happens.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

MAX_SHOWN = 8


def render_value(field: Any, gguf: Any) -> str:
    """A short rendering of a metadata field's value."""
    types = field.types
    if not types:
        return "<no value>"
    main = types[0]
    if main == gguf.GGUFValueType.ARRAY:
        # parts: key length, key bytes, value type, element type, element count, elements...
        elem = gguf.GGUFValueType(int(field.parts[3][0])).name.lower()
        n = int(field.parts[4][0])
        if elem == "array":
            # gguf-py flattens nested arrays and records only the first element's types.
            inner = "/".join(t.name.lower() for t in types[2:]) or "?"
            return f"[{n} nested arrays, first of {inner}]"
        try:
            shown = field.contents(slice(0, MAX_SHOWN))
        except Exception as e:  # noqa: BLE001 - a rendering problem is not a read failure
            return f"[{n} x {elem}] (cannot render: {e})"
        more = f", ... ({n} elements)" if n > MAX_SHOWN else ""
        return f"[{', '.join(repr(x) for x in shown)}{more}] ({elem})"
    value = field.contents()
    return repr(value)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", help="the .gguf file")
    ap.add_argument("--expect-arch", help="required value of general.architecture")
    ap.add_argument("--expect-tensors", type=int, help="required number of tensors")
    ap.add_argument("--quiet", action="store_true", help="print only the summary")
    args = ap.parse_args()

    try:
        import gguf  # type: ignore[import-not-found]
    except ImportError:
        print("error: the `gguf` package is missing; pip install -r scripts/requirements-gguf.txt",
              file=sys.stderr)
        return 2

    version = getattr(gguf, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version
            version = dist_version("gguf")
        except Exception:  # noqa: BLE001
            version = "?"

    try:
        reader = gguf.GGUFReader(args.file, "r")
    except Exception as e:  # noqa: BLE001 - any refusal by the reader is the answer
        print(f"error: gguf {version} cannot read {args.file}: {type(e).__name__}: {e}", file=sys.stderr)
        if "GGMLQuantizationType" in str(e) and "36" in str(e):
            print("hint: ggml type 36 is bitnet.cpp's I2_S, which upstream gguf-py does not know",
                  file=sys.stderr)
        return 2

    failures: list[str] = []
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    header = {k: reader.fields[k].contents() for k in reader.fields if k.startswith("GGUF.")}
    if not args.quiet:
        print(f"# {args.file} (read with gguf {version})")
        print(f"# version {header.get('GGUF.version')}, {len(keys)} metadata keys, "
              f"{len(reader.tensors)} tensors, alignment {reader.alignment}, data at {reader.data_offset}")
        for k in keys:
            f = reader.fields[k]
            type_name = f.types[0].name.lower() if f.types else "?"
            print(f"kv  {k} : {type_name} = {render_value(f, gguf)}")

    for t in reader.tensors:
        shape = [int(d) for d in t.shape]
        if not args.quiet:
            print(f"tensor  {t.name} : {t.tensor_type.name} {shape} n_bytes={int(t.n_bytes)} "
                  f"offset={int(t.data_offset)}")
        end = int(t.data_offset) + int(t.n_bytes)
        if end > len(reader.data):
            failures.append(f"tensor {t.name} ends at byte {end}, past the end of the file")

    arch_field = reader.fields.get("general.architecture")
    arch = arch_field.contents() if arch_field is not None else None
    if args.expect_arch is not None and arch != args.expect_arch:
        failures.append(f"general.architecture is {arch!r}, expected {args.expect_arch!r}")
    if args.expect_tensors is not None and len(reader.tensors) != args.expect_tensors:
        failures.append(f"{len(reader.tensors)} tensors, expected {args.expect_tensors}")

    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(types.items()))
    print(f"read OK: arch={arch!r}, {len(keys)} keys, {len(reader.tensors)} tensors ({summary})")

    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
