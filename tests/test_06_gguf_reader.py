"""Chapter 06: our GGUF reader — metadata and tensor infos equal ``gguf.GGUFReader``'s on the real SmolLM2 file and on
a file holding every value type, every dequantizer is bit-identical to ``gguf.quants.dequantize`` (all 272 SmolLM2
tensors, random blocks of each type), and broken files fail with one clear ValueError."""

import struct

import gguf
import numpy as np
import pytest
import torch

from ch06.gguf_reader import DEQUANTIZERS, GGML_TYPES, VALUE_TYPES, dequantize, main, read_gguf

Q = gguf.GGMLQuantizationType
V = gguf.GGUFValueType
pytestmark = pytest.mark.usefixtures("one_thread")  # small torch ops on a shared 2-core box: 1 thread is ~20x faster


def as_bytes(a) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8).reshape(-1)


def bits(a) -> np.ndarray:
    """float32 values as their bit patterns, so equality means bit-identical (and -0.0 != 0.0)."""
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32)).view(np.uint32)


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return read_gguf(smollm2_path), gguf.GGUFReader(smollm2_path)


def test_smollm2_metadata_and_tensor_infos_match_gguf_reader(smol):
    ours, ref = smol
    fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}  # header counts, not metadata
    assert ours.version == ref.fields["GGUF.version"].contents() == 3
    assert list(ours.metadata) == list(fields)
    for key, field in fields.items():
        types = [V(t).name.lower() for t in field.types]
        assert ours.value_types[key] == (f"array[{types[1]}]" if types[0] == "array" else types[0]), key
        assert ours.metadata[key] == field.contents(), key
    assert ours.architecture == "llama" and ours.metadata["llama.attention.head_count_kv"] == 3
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152
    assert ours.alignment == ref.alignment == 32 and ours.data_offset == ref.data_offset
    assert list(ours.tensors) == [t.name for t in ref.tensors] and len(ours.tensors) == 272
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.dims == tuple(int(d) for d in t.shape) and mine.ggml_type == t.tensor_type
        assert (mine.start, mine.n_bytes, mine.n_elements) == (t.data_offset, t.n_bytes, t.n_elements)
        assert np.shares_memory(ours.raw(t.name), ours.raw(t.name))  # a memmap view, nothing copied yet
        assert np.array_equal(as_bytes(ours.raw(t.name)), as_bytes(t.data))
    counts = {r["type"]: r["tensors"] for r in ours.type_counts()}
    assert counts == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
    assert ours.tensors["token_embd.weight"].shape == (49152, 576)


def test_every_smollm2_tensor_dequantizes_bit_identically(smol):
    ours, ref = smol
    for t in ref.tensors:
        mine = ours.tensor(t.name)
        expect = gguf.quants.dequantize(t.data, t.tensor_type)
        assert mine.dtype == torch.float32 and mine.shape == expect.shape == ours.tensors[t.name].shape, t.name
        assert np.array_equal(bits(mine), bits(expect)), t.name


def test_type_table_matches_ggml():
    for i, (name, block, block_bytes) in GGML_TYPES.items():
        assert Q(i).name == name
        # gguf-py 0.19 lists Q8_1 as 40 bytes (float d, s); ggml's block_q8_1 is two fp16 + 32 int8 = 36, with a
        # static_assert in ggml-common.h. Q8_1 is llama.cpp's activation format and never stored in a file.
        assert gguf.GGML_QUANT_SIZES[Q(i)] == ((32, 40) if name == "Q8_1" else (block, block_bytes))
    assert GGML_TYPES[9] == ("Q8_1", 32, 36)
    assert {i: n for i, (n, _) in VALUE_TYPES.items()} == {int(t): t.name.lower() for t in V}


def _random_blocks(qtype, n_blocks: int, rng) -> np.ndarray:
    """Random code bytes with finite fp16 scales (zero, subnormal, negative, large) at each block's scale slots."""
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
    n_scales = {Q.Q4_1: 2, Q.Q5_1: 2}.get(qtype, 1)
    scales = (rng.standard_normal((n_blocks, n_scales)) * 10.0 ** rng.integers(-7, 4, (n_blocks, 1))).astype(np.float16)
    scales[:3] = [[0.0], [-0.0], [6e-8]][:3] if n_scales == 1 else [[0.0, 1.0], [-0.0, -2.0], [6e-8, 6e-8]]
    raw[:, : 2 * n_scales] = scales.view(np.uint8)
    return raw


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_block_dequantizers_bit_identical_on_random_and_quantized_blocks(qtype):
    rng = np.random.default_rng(int(qtype))
    raw = _random_blocks(qtype, 4096, rng)
    assert np.array_equal(bits(dequantize(raw, int(qtype), (4096, 32))), bits(gguf.quants.dequantize(raw, qtype)))
    x = rng.standard_normal((16, 256)).astype(np.float32) * np.logspace(-4, 2, 16, dtype=np.float32)[:, None]
    q = gguf.quants.quantize(x, qtype)
    ours = dequantize(q, qtype.name, x.shape)
    assert np.array_equal(bits(ours), bits(gguf.quants.dequantize(q, qtype)))
    assert np.abs(ours.numpy() - x).max() <= np.abs(x).max() / 4  # and it is a dequantization of x, not noise


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16])
def test_float_types_bit_identical(qtype):
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32) * 1e3
    raw = gguf.quants.quantize(x, qtype).view(np.uint8)
    assert np.array_equal(bits(dequantize(raw, int(qtype), x.shape)), bits(gguf.quants.dequantize(raw, qtype)))


# ------------------------------------------------------------------------------------- a file of every kind


ALL_VALUES = [  # (key, value, value type, array item type)
    ("t.u8", 250, V.UINT8, None),
    ("t.i8", -100, V.INT8, None),
    ("t.u16", 65000, V.UINT16, None),
    ("t.i16", -32000, V.INT16, None),
    ("t.u32", 4_000_000_000, V.UINT32, None),
    ("t.i32", -2_000_000_000, V.INT32, None),
    ("t.f32", 0.1, V.FLOAT32, None),
    ("t.bool", True, V.BOOL, None),
    ("t.str", "naïve ✓ | tab\tnew\nline", V.STRING, None),
    ("t.u64", 2**63 + 5, V.UINT64, None),
    ("t.i64", -(2**62), V.INT64, None),
    ("t.f64", 1 / 3, V.FLOAT64, None),
    ("t.arr_i16", [-3, 0, 7], V.ARRAY, V.INT16),
    ("t.arr_f64", [0.5, -1e300], V.ARRAY, V.FLOAT64),
    ("t.arr_bool", [True, False, True], V.ARRAY, V.BOOL),
    ("t.arr_str", ["a", "", "ü" * 40], V.ARRAY, V.STRING),
]
NESTED = [[1, 2], [3]]  # an array of arrays: in the spec; gguf's reader does not unpack it


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    """A GGUF with every metadata value type, alignment 64, and tensors of many storage types."""
    path = tmp_path_factory.mktemp("gguf") / "all.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_custom_alignment(64)
    for key, value, vtype, sub in ALL_VALUES:
        w.add_key_value(key, value, vtype, sub_type=sub)
    w.add_key_value("t.nested", NESTED, V.ARRAY, sub_type=V.ARRAY)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    for qt in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1):
        w.add_tensor(f"w.{qt.name}", gguf.quants.quantize(x, qt), raw_dtype=None if qt in (Q.F32, Q.F16) else qt)
    w.add_tensor("w.vector", np.arange(5, dtype=np.float32))
    w.add_tensor("w.k_quant", rng.integers(0, 256, (2, 144), dtype=np.uint8), raw_dtype=Q.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, x


def test_every_value_type_and_storage_type_read_back(small_file):
    path, x = small_file
    ours, ref = read_gguf(path), gguf.GGUFReader(path)
    for key, value, vtype, sub in ALL_VALUES:
        assert ours.metadata[key] == ref.fields[key].contents(), key
        expect = np.float32(value).item() if vtype == V.FLOAT32 else value
        assert ours.metadata[key] == expect and type(ours.metadata[key]) is type(expect), key
        assert ours.value_types[key] == (f"array[{sub.name.lower()}]" if sub else vtype.name.lower())
    assert ours.metadata["t.nested"] == NESTED and ours.value_types["t.nested"] == "array[array]"
    assert ours.alignment == 64 and ours.data_offset % 64 == 0 and ours.data_offset == ref.data_offset
    assert all(t.offset % 64 == 0 for t in ours.tensors.values())
    for t in ref.tensors:
        assert ours.tensors[t.name].start == t.data_offset and np.array_equal(
            as_bytes(ours.raw(t.name)), as_bytes(t.data)
        )
        if t.tensor_type != Q.Q4_K:
            got = ours.tensor(t.name)
            assert np.array_equal(bits(got), bits(gguf.quants.dequantize(t.data, t.tensor_type)))
    assert torch.equal(ours.tensor("w.F32"), torch.from_numpy(x)) and ours.tensor("w.vector").tolist() == [
        0,
        1,
        2,
        3,
        4,
    ]
    assert ours.tensors["w.Q4_1"].dims == (64, 3) and ours.tensors["w.Q4_1"].n_bytes == 3 * 2 * 20


# ------------------------------------------------------------------------------------------------ errors


def _patched(src, dst, needle: bytes, skip: int, new: bytes):
    """Copy ``src`` to ``dst`` with the bytes at (first ``needle`` + len(needle) + skip) overwritten by ``new``."""
    data = bytearray(src.read_bytes())
    at = data.index(needle) + len(needle) + skip
    data[at : at + len(new)] = new
    dst.write_bytes(bytes(data))
    return dst


def test_errors_name_the_problem(small_file, tmp_path, smollm2_path):
    path, _ = small_file
    data = path.read_bytes()
    cases = [
        (b"GGML" + data[4:], r"not a GGUF file: magic b'GGML'"),
        (data[:10], r"shorter than the 24-byte header"),
        (data[:300], r"truncated GGUF file: metadata"),
        (data[:-100], r"truncated GGUF file: tensor 'w.k_quant' \(Q4_K, 288 bytes\) ends at byte"),
        (data[:4] + struct.pack("<I", 1) + data[8:], r"GGUF version 1 is not supported"),
        (data[:4] + struct.pack(">I", 3) + data[8:], r"big-endian"),
    ]
    for i, (blob, message) in enumerate(cases):
        (tmp_path / f"{i}.gguf").write_bytes(blob)
        with pytest.raises(ValueError, match=message):
            read_gguf(tmp_path / f"{i}.gguf")
    bad_value = _patched(path, tmp_path / "v.gguf", b"t.i16", 0, struct.pack("<I", 99))
    with pytest.raises(ValueError, match=r"metadata key 't.i16' has unknown value type 99"):
        read_gguf(bad_value)
    bad_item = _patched(path, tmp_path / "a.gguf", b"t.arr_i16", 4, struct.pack("<I", 13))
    with pytest.raises(ValueError, match=r"'t.arr_i16' is an array of unknown value type 13"):
        read_gguf(bad_item)
    bad_type = _patched(path, tmp_path / "t.gguf", b"w.vector", 4 + 8, struct.pack("<I", 77))  # n_dims, dims[0]
    with pytest.raises(ValueError, match=r"tensor 'w.vector' has unknown ggml type 77"):
        read_gguf(bad_type)
    with pytest.raises(ValueError, match=r"tensor 'w.k_quant' has ggml type Q4_K, which this reader does not"):
        read_gguf(path).tensor("w.k_quant")
    with open(smollm2_path, "rb") as f:  # the real file cut inside its tensor data
        (tmp_path / "cut.gguf").write_bytes(f.read(3_000_000))
    with pytest.raises(ValueError, match=r"truncated GGUF file: tensor 'token_embd.weight' \(Q8_0, 30081024 bytes\)"):
        read_gguf(tmp_path / "cut.gguf")
    with pytest.raises(SystemExit, match="cannot read .*not a GGUF file"):
        main([str(tmp_path / "0.gguf")])
    assert set(DEQUANTIZERS) == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"}


def test_main_summarizes_the_file(smollm2_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "GGUF" in capsys.readouterr().out
    f = main([])  # default: the installed SmolLM2 file
    out = capsys.readouterr().out
    assert f.path == smollm2_path
    assert "| llama.embedding_length | uint32 | 576 |" in out and "| Q4_1 | 210 | 106,168,320 |" in out
    assert "5.744 bits/weight" in out  # 210 Q4_1 (5.0 bits) + token_embd Q8_0 (8.5) + F32 norms
