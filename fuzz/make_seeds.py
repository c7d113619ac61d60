#!/usr/bin/env python3
"""Writes the curated seed inputs under fuzz/corpus/ (run from anywhere; stdlib only).

gguf_reader:
  tiny-all-types.gguf      valid v3 file: every metadata value type, a string array, a
                           two-level nested array, general.alignment, two tensors (F32, F16)
  tiny-i2s-v2-align64.gguf valid v2 file with alignment 64 and an I2_S tensor + trailer
  tiny-empty.gguf          valid: no tensors, no metadata (just the 24-byte header)
  tiny-all-types-trunc.gguf the first file cut inside the tensor infos
  fixture-TQ2_0-head.gguf  first 14 KiB of testdata/tiny-bitnet/gguf/tiny-bitnet-TQ2_0.gguf
                           (header, real metadata incl. the tokenizer arrays, tensor infos;
                           the data is cut off, so it does not parse; it is a seed only)
safetensors_header:
  tiny-mixed.safetensors   valid: F32, F16, BF16, I8, U8 tensors and __metadata__
  tiny-empty.safetensors   valid: header `{}` and no data
  tiny-i32.safetensors     valid for the safetensors crate, rejected here (I32 unsupported)
  tiny-mixed-trunc-*.safetensors  the first file cut in the header and in the data
  regress-offset-overflow.safetensors  offsets near 2^64 (overflowed inside safetensors 0.6)
  fixture-hf_packed-head.safetensors  the 8-byte length + JSON header of
                           testdata/tiny-bitnet/hf_packed/model.safetensors (no data)
"""

import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# GGUF value type ids.
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)


def s(text):
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def kv(key, ty, payload):
    return s(key) + struct.pack("<I", ty) + payload


def arr(elem, count, payload):
    return struct.pack("<IQ", elem, count) + payload


def tensor_info(name, dims, ggml_type, offset):
    return (
        s(name)
        + struct.pack("<I", len(dims))
        + b"".join(struct.pack("<Q", d) for d in dims)
        + struct.pack("<IQ", ggml_type, offset)
    )


def gguf(version, kvs, infos, data, alignment=32):
    head = b"GGUF" + struct.pack("<IQQ", version, len(infos), len(kvs))
    body = head + b"".join(kvs) + b"".join(infos)
    pad = (-len(body)) % alignment
    return body + b"\0" * pad + data


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)
    print(f"{target}/{name}: {len(data)} bytes")


def gguf_seeds():
    nested = arr(
        ARRAY,
        2,
        arr(I16, 2, struct.pack("<hh", -1, 2)) + arr(I16, 1, struct.pack("<h", 3)),
    )
    kvs = [
        kv("general.architecture", STRING, s("bitnet")),
        kv("general.alignment", U32, struct.pack("<I", 32)),
        kv("t.u8", U8, struct.pack("<B", 200)),
        kv("t.i8", I8, struct.pack("<b", -5)),
        kv("t.u16", U16, struct.pack("<H", 60000)),
        kv("t.i16", I16, struct.pack("<h", -300)),
        kv("t.i32", I32, struct.pack("<i", -70000)),
        kv("t.f32", F32, struct.pack("<f", 1e-5)),
        kv("t.bool", BOOL, b"\x01"),
        kv("t.u64", U64, struct.pack("<Q", 1 << 40)),
        kv("t.i64", I64, struct.pack("<q", -(1 << 40))),
        kv("t.f64", F64, struct.pack("<d", 10000.0)),
        kv("t.tokens", ARRAY, arr(STRING, 3, s("<s>") + s("a") + s("\u2581b"))),
        kv("t.scores", ARRAY, arr(F32, 3, struct.pack("<3f", 0.0, -1.5, 2.0))),
        kv("t.bools", ARRAY, arr(BOOL, 2, b"\x00\x01")),
        kv("t.nested", ARRAY, nested),
    ]
    infos = [
        tensor_info("a.weight", [4], 0, 0),  # F32, 16 bytes
        tensor_info("b.weight", [3, 2], 1, 32),  # F16, 12 bytes
    ]
    data = struct.pack("<4f", 1.0, -2.0, 0.5, 3.0) + b"\0" * 16
    data += struct.pack("<6e", 1, 2, 3, 4, 5, 6)
    full = gguf(3, kvs, infos, data)
    write("gguf_reader", "tiny-all-types.gguf", full)
    infos_end = full.index(b"b.weight") + 4
    write("gguf_reader", "tiny-all-types-trunc.gguf", full[:infos_end])

    # I2_S: 2 bits per element, 4 elements per byte; 128 x 2 elements = 64 bytes of codes,
    # then the 32-byte trailer whose first 4 bytes are the f32 scale.
    kvs = [
        kv("general.architecture", STRING, s("bitnet")),
        kv("general.alignment", U64, struct.pack("<Q", 64)),
    ]
    infos = [tensor_info("blk.0.ffn_up.weight", [128, 2], 36, 0)]
    data = bytes(range(64)) + struct.pack("<f", 0.25) + b"\0" * 28
    write("gguf_reader", "tiny-i2s-v2-align64.gguf", gguf(2, kvs, infos, data, alignment=64))

    write("gguf_reader", "tiny-empty.gguf", gguf(3, [], [], b"", alignment=1))

    fixture = os.path.join(ROOT, "testdata/tiny-bitnet/gguf/tiny-bitnet-TQ2_0.gguf")
    with open(fixture, "rb") as f:
        write("gguf_reader", "fixture-TQ2_0-head.gguf", f.read(14 * 1024))


def safetensors(tensors, metadata=None):
    """tensors: list of (name, dtype, shape, raw bytes)."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    data = b""
    for name, dtype, shape, raw in tensors:
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((-len(h)) % 8)
    return struct.pack("<Q", len(h)) + h + data


def safetensors_seeds():
    full = safetensors(
        [
            ("model.norm.weight", "F32", [2, 2], struct.pack("<4f", 1, 2, 3, 4)),
            ("model.embed.weight", "F16", [3], struct.pack("<3e", 0.5, -1, 2)),
            ("lm_head.weight", "BF16", [1, 2], b"\x80\x3f\x00\x40"),
            ("w.codes", "U8", [4], b"\x00\x55\xaa\xff"),
            ("w.i8", "I8", [2], b"\x7f\x80"),
        ],
        metadata={"format": "pt"},
    )
    write("safetensors_header", "tiny-mixed.safetensors", full)
    header_end = 8 + struct.unpack("<Q", full[:8])[0]
    write("safetensors_header", "tiny-mixed-trunc-header.safetensors", full[: header_end // 2])
    write("safetensors_header", "tiny-mixed-trunc-data.safetensors", full[:-3])
    write("safetensors_header", "tiny-empty.safetensors", safetensors([]))
    write(
        "safetensors_header",
        "tiny-i32.safetensors",
        safetensors([("x", "I32", [2], struct.pack("<2i", 1, -1))]),
    )
    # Regression: offsets summing to nearly 2^64 made safetensors 0.6's read_metadata
    # overflow (a panic with overflow checks); now rejected up front by safetensors.rs.
    size = (1 << 61) - 1
    header = {
        f"t{i}": {"dtype": "U8", "shape": [size], "data_offsets": [i * size, (i + 1) * size]}
        for i in range(8)
    }
    h = json.dumps(header, separators=(",", ":")).encode()
    write(
        "safetensors_header",
        "regress-offset-overflow.safetensors",
        struct.pack("<Q", len(h)) + h,
    )
    fixture = os.path.join(ROOT, "testdata/tiny-bitnet/hf_packed/model.safetensors")
    with open(fixture, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        f.seek(0)
        write("safetensors_header", "fixture-hf_packed-head.safetensors", f.read(8 + n))


if __name__ == "__main__":
    gguf_seeds()
    safetensors_seeds()
