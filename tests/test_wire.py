"""The wire format: streaming validation of safetensors bytes, chunked reads, atomic files."""

from __future__ import annotations

import hashlib
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load, save

from fedmeki_core.errors import InvalidUpdateError, LimitExceededError
from fedmeki_core.files import atomic_write, sha256_file
from fedmeki_core.stream_validation import ExpectedLayout, SafetensorsStreamValidator
from fedmeki_core.wire import (
    TensorSpec,
    header_bound,
    iter_file_chunks,
    iter_tensors,
    read_layout,
    read_manifest,
    write_safetensors,
)

MANIFEST = [TensorSpec("weight", "F32", (3, 4)), TensorSpec("bias", "F16", (5,))]


def _payload(weight: np.ndarray | None = None, bias: np.ndarray | None = None) -> bytes:
    return save(
        {
            "weight": np.arange(12, dtype=np.float32).reshape(3, 4) if weight is None else weight,
            "bias": np.ones(5, dtype=np.float16) if bias is None else bias,
        }
    )


def _validate(
    payload: bytes,
    chunk: int = 1 << 20,
    manifest: list[TensorSpec] | None = MANIFEST,
    total: int | None = None,
    max_header: int = 1 << 20,
) -> None:
    validator = SafetensorsStreamValidator(manifest, len(payload) if total is None else total, max_header)
    for start in range(0, len(payload), chunk):
        validator.feed(payload[start : start + chunk])
    validator.finish()


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_a_valid_stream_passes_in_any_chunking(chunk: int) -> None:
    _validate(_payload(), chunk)


def test_without_a_manifest_the_file_defines_it() -> None:
    _validate(_payload(), 5, manifest=None)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (save({"weight": np.zeros((3, 4), np.float32)}), "missing tensor 'bias'"),
        (
            save(
                {
                    "weight": np.zeros((3, 4), np.float32),
                    "bias": np.zeros(5, np.float16),
                    "extra": np.zeros(1, np.float32),
                }
            ),
            "tensor 'extra' is not in the round's manifest",
        ),
        (_payload(weight=np.zeros((4, 3), np.float32)), "tensor 'weight' has shape [4, 3], the manifest says [3, 4]"),
        (_payload(bias=np.zeros(5, np.float32)), "tensor 'bias' has dtype F32, the manifest says F16"),
        (_payload(weight=np.full((3, 4), np.nan, np.float32)), "tensor 'weight' contains NaN or Inf"),
        (_payload(bias=np.array([0, 0, np.inf, 0, 0], np.float16)), "tensor 'bias' contains NaN or Inf"),
        (_payload(weight=np.full((3, 4), np.inf, np.float32)), "tensor 'weight' contains NaN or Inf"),
        (_payload(weight=np.full((3, 4), -np.inf, np.float32)), "tensor 'weight' contains NaN or Inf"),
        (struct.pack("<Q", 4) + b"oops", "not valid JSON"),
    ],
)
def test_each_violation_is_named(payload: bytes, message: str) -> None:
    for chunk in (3, 1 << 20):
        with pytest.raises(InvalidUpdateError, match=message.replace("[", r"\[").replace("]", r"\]")):
            _validate(payload, chunk)


def _framed(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


_WEIGHT = b'"weight":{"dtype":"F32","shape":[3,4],"data_offsets":[0,48]}'
_BIAS = b'"bias":{"dtype":"F16","shape":[5],"data_offsets":[48,58]}'


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"{" + _WEIGHT + b"," + _WEIGHT + b"," + _BIAS + b"}", "duplicate key 'weight'"),  # json keeps the last
        (b"{" + _WEIGHT + b"," + _BIAS.replace(b'"F16"', b'"F32","dtype":"F16"') + b"}", "duplicate key 'dtype'"),
        (b'{"a":' + b"[" * 30_000 + b"]" * 30_000 + b"}", "not valid JSON"),  # RecursionError in the parser
        (b'{"a":[' + b"9" * 5000 + b"]}", "not valid JSON"),  # beyond Python's int conversion limit
        (b"\xef\xbb\xbf{" + _WEIGHT + b"," + _BIAS + b"}", "not valid JSON"),  # a byte-order mark
        (("{" + (_WEIGHT + b"," + _BIAS).decode() + "}").encode("utf-16"), "not valid JSON"),  # not UTF-8
        (b'{"__metadata__":null,' + _WEIGHT + b"," + _BIAS + b"}", "__metadata__ must be an object of strings"),
        (b'{"__metadata__":{"format":5},' + _WEIGHT + b"," + _BIAS + b"}", "__metadata__ must be an object of strings"),
    ],
    ids=["repeated-name", "repeated-field", "deep", "long-int", "bom", "utf-16", "null-metadata", "int-metadata"],
)
def test_headers_python_would_accept_but_safetensors_must_not(header: bytes, message: str) -> None:
    payload = _framed(header, b"\0" * 58)
    with pytest.raises(InvalidUpdateError, match=message):
        SafetensorsStreamValidator(MANIFEST, len(payload), len(header)).feed(payload)


def test_an_update_header_is_capped_by_its_manifest() -> None:
    """However high the setting, an update's header may be only as long as its manifest needs, plus some slack."""
    bound = header_bound(MANIFEST)
    assert bound < 70_000
    with pytest.raises(LimitExceededError, match=f"exceeds the limit of {bound}"):
        SafetensorsStreamValidator(MANIFEST, 1 << 30, 1 << 30).feed(struct.pack("<Q", bound + 1))
    SafetensorsStreamValidator(None, 1 << 30, 1 << 30).feed(struct.pack("<Q", bound + 1))  # no manifest: the setting


@pytest.mark.parametrize("order", ["manifest", "reversed"])
def test_one_layout_serves_every_upload_in_the_manifests_order_or_another(order: str) -> None:
    """A job derives its ExpectedLayout once; an update in the manifest's order is checked by one comparison, one
    in another order entry by entry, and both pass, as often as they come."""
    layout = ExpectedLayout(MANIFEST)
    weight, bias = np.arange(12, dtype=np.float32), np.ones(5, dtype=np.float16)
    if order == "manifest":
        assert layout.usual_spans(json.loads(_WEIGHT_FIRST)) is not None
        payload = _framed(_WEIGHT_FIRST, weight.tobytes() + bias.tobytes())
    else:
        header = (
            b'{"bias":{"dtype":"F16","shape":[5],"data_offsets":[0,10]},' + _WEIGHT.replace(b"0,48", b"10,58") + b"}"
        )
        assert layout.usual_spans(json.loads(header)) is None
        payload = _framed(header, bias.tobytes() + weight.tobytes())
    for _ in range(3):
        validator = SafetensorsStreamValidator(layout, len(payload))
        validator.feed(payload)
        validator.finish()
    last = np.array([np.inf], np.float16 if order == "manifest" else np.float32).tobytes()
    bad = payload[: -len(last)] + last  # the last value, whichever tensor holds it
    with pytest.raises(InvalidUpdateError, match="contains NaN or Inf"):
        SafetensorsStreamValidator(layout, len(bad)).feed(bad)


_WEIGHT_FIRST = b"{" + _WEIGHT + b"," + _BIAS + b"}"


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (_WEIGHT_FIRST.replace(b"[3,4]", b"[3.0,4]"), "shape must be a list"),
        (_WEIGHT_FIRST.replace(b"[5]", b"[5.0]"), "shape must be a list"),
        (_WEIGHT_FIRST.replace(b"[3,4]", b"[3,4,true]"), "shape must be a list"),
        (_WEIGHT_FIRST.replace(b"[48,58]", b"[48.0,58]"), "data_offsets must be"),
        (b'{"__metadata__":{"fedmeki.untrained":"head"},' + _WEIGHT_FIRST[1:], "tensor 'head' is not in the round"),
        (b'{"__metadata__":{"fedmeki.local_steps":"0"},' + _WEIGHT_FIRST[1:], "must be an integer from 1"),
    ],
    ids=["float-dim", "float-dim-bias", "bool-dim", "float-offset", "untrained-unknown", "bad-local-steps"],
)
def test_a_header_laid_out_as_usual_is_still_checked_in_full(header: bytes, message: str) -> None:
    """The usual layout's one comparison equates 3.0 and True with integers: the header's types and its metadata
    are checked before it, so a header that compares equal but is not the usual file is refused all the same."""
    layout = ExpectedLayout(MANIFEST)
    usual = _framed(_WEIGHT_FIRST, b"\0" * 58)
    SafetensorsStreamValidator(layout, len(usual)).feed(usual)  # the layout now remembers the usual header
    payload = _framed(header, b"\0" * 58)
    with pytest.raises(InvalidUpdateError, match=message):
        SafetensorsStreamValidator(layout, len(payload)).feed(payload)


def test_a_header_read_again_is_the_one_read_before_and_any_other_is_read_afresh() -> None:
    """Hundreds of silos send the same header bytes: the layout parses them once and hands the same answer again;
    other bytes (another silo's metadata) are parsed, and a malformed header after a good one is still refused."""
    layout = ExpectedLayout(MANIFEST)
    header, spans = layout.read_header(_WEIGHT_FIRST)
    again, spans_again = layout.read_header(bytes(bytearray(_WEIGHT_FIRST)))  # equal bytes, another object
    assert again is header and spans_again is spans and spans is not None
    steps = b'{"__metadata__":{"fedmeki.local_steps":"7"},' + _WEIGHT_FIRST[1:]
    other, other_spans = layout.read_header(steps)
    assert other is not header and other["__metadata__"] == {"fedmeki.local_steps": "7"} and other_spans == spans
    with pytest.raises(InvalidUpdateError, match="not valid JSON"):
        layout.read_header(_WEIGHT_FIRST[:-1])
    assert layout.read_header(steps)[0] is other  # a refused header is not remembered


def test_bf16_infinity_is_caught() -> None:
    header = b'{"x":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}'
    payload = struct.pack("<Q", len(header)) + header + struct.pack("<2H", 0x3F80, 0x7F80)
    with pytest.raises(InvalidUpdateError, match="NaN or Inf"):
        _validate(payload, manifest=[TensorSpec("x", "BF16", (2,))])


@pytest.mark.parametrize("chunk", [3, 64, 1 << 20])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_a_bad_value_among_many_small_tensors_of_a_chunk_is_named(chunk: int, dtype: type) -> None:
    # Tensors of one dtype are checked together a chunk at a time; the error still names the tensor.
    tensors = {f"t{i:03d}": np.full((i % 5 + 1,), 0.5, dtype) for i in range(60)}
    tensors["t037"][-1] = np.nan
    tensors["t040"] = np.zeros(3, np.float64)  # another dtype among them
    manifest = [
        TensorSpec(name, {np.float32: "F32", np.float16: "F16"}.get(a.dtype.type, "F64"), a.shape)
        for name, a in tensors.items()
    ]
    with pytest.raises(InvalidUpdateError, match="tensor 't037' contains NaN or Inf"):
        _validate(save(tensors), chunk, manifest=manifest)
    tensors["t037"][-1] = 0
    _validate(save(tensors), chunk, manifest=manifest)


def test_without_a_manifest_values_are_still_checked() -> None:
    with pytest.raises(InvalidUpdateError, match="tensor 'weight' contains NaN or Inf"):
        _validate(_payload(weight=np.full((3, 4), np.nan, np.float32)), 7, manifest=None)


def test_size_problems() -> None:
    payload = _payload()
    with pytest.raises(LimitExceededError, match="exceeds the limit"):
        _validate(payload, max_header=16)
    with pytest.raises(InvalidUpdateError, match="more than the declared"):
        _validate(payload, total=len(payload) - 1)
    for chunk in (1, 7, 1 << 20):  # a whole, valid file followed by one byte more than declared
        with pytest.raises(InvalidUpdateError, match="more than the declared"):
            _validate(payload + b"\0", chunk, total=len(payload))
    with pytest.raises(InvalidUpdateError, match="does not match the file's layout"):
        _validate(payload, total=len(payload) + 4)
    with pytest.raises(InvalidUpdateError, match="does not match the file's layout"):
        _validate(payload + b"\0" * 4)
    with pytest.raises(InvalidUpdateError, match="truncated"):
        validator = SafetensorsStreamValidator(MANIFEST, len(payload))
        validator.feed(payload[:-3])
        validator.finish()


def test_overlapping_offsets_are_rejected() -> None:
    header = (
        b'{"weight":{"dtype":"F32","shape":[3,4],"data_offsets":[0,48]},'
        b'"bias":{"dtype":"F16","shape":[5],"data_offsets":[40,50]}}'
    )
    payload = struct.pack("<Q", len(header)) + header + b"\0" * 50
    with pytest.raises(InvalidUpdateError, match="overlap or leave a gap"):
        _validate(payload)


@pytest.mark.parametrize(
    "tensors",
    [
        {"a": np.ones(3, np.float32), "z": np.zeros(0, np.float32)},  # stored last: data_offsets [12, 12]
        {"a": np.zeros(0, np.float32), "b": np.ones(3, np.float32)},  # both start at 0
        {"a": np.zeros((2, 0), np.float16), "b": np.zeros(0, np.float32)},  # no data section at all
    ],
    ids=["empty-last", "empty-first", "only-empty"],
)
def test_tensors_without_elements_are_valid(tensors: dict[str, np.ndarray]) -> None:
    payload = save(tensors)
    manifest = [TensorSpec(name, "F32" if v.dtype == np.float32 else "F16", v.shape) for name, v in tensors.items()]
    for chunk in (1, 7, 1 << 20):
        _validate(payload, chunk, manifest=manifest)
        _validate(payload, chunk, manifest=None)


def _raw(entries: dict[str, object], data: bytes) -> bytes:
    header = json.dumps(entries).encode()
    return struct.pack("<Q", len(header)) + header + data


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": "ab", "data_offsets": [0, 12]},
        {"dtype": "F32", "shape": 3, "data_offsets": [0, 12]},
        {"dtype": "F32", "shape": [1.5, 2], "data_offsets": [0, 12]},
        {"dtype": "F32", "shape": [-1, -3], "data_offsets": [0, 12]},
        {"dtype": "F32", "shape": [3], "data_offsets": [0, 12, 12]},
        {"dtype": "F32", "shape": [3], "data_offsets": ["0", "12"]},
        {"dtype": ["F32"], "shape": [3], "data_offsets": [0, 12]},
    ],
    ids=[
        "shape-string",
        "shape-int",
        "shape-float",
        "shape-negative",
        "offsets-3",
        "offsets-strings",
        "dtype-list",
    ],
)
@pytest.mark.parametrize("manifest", [[TensorSpec("x", "F32", (3,))], None], ids=["manifest", "no-manifest"])
def test_malformed_header_entries_are_invalid_updates(
    entry: dict[str, object], manifest: list[TensorSpec] | None
) -> None:
    """Whatever a header holds, the validator answers InvalidUpdateError, never a TypeError or ValueError."""
    with pytest.raises(InvalidUpdateError):
        _validate(_raw({"x": entry}, b"\0" * 12), manifest=manifest)


@pytest.mark.parametrize("shape", [[10**30, 0], [2**31, 0], [1] * 17 + [0]], ids=["10^30", "2^31", "rank-18"])
def test_an_empty_tensor_with_an_impossible_shape_is_refused(shape: list[int]) -> None:
    """No bytes, so the layout holds, but no int64 (nor any model) holds such a shape: refused at the door."""
    with pytest.raises(InvalidUpdateError, match="shape must be a list of at most 16 integers"):
        _validate(_raw({"x": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}, b""), manifest=None)


@pytest.mark.parametrize("offset", [0, 1, 15, 16, 17, 100])
def test_file_chunks_start_at_any_offset(tmp_path: Path, offset: int) -> None:
    path = tmp_path / "blob"
    content = bytes(range(50))
    path.write_bytes(content)
    chunks = list(iter_file_chunks(path, offset=offset, chunk_bytes=16))
    assert b"".join(c.data for c in chunks) == content[offset:]
    assert [c.offset for c in chunks] == list(range(offset, len(content), 16))
    assert all(0 < len(c.data) <= 16 for c in chunks)


def test_written_files_read_back_with_safetensors_and_our_readers(tmp_path: Path) -> None:
    order = [TensorSpec("b", "F32", (2, 3)), TensorSpec("a", "F64", (4,))]
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.linspace(0, 1, 4)]
    buffer = io.BytesIO()
    write_safetensors(buffer, order, arrays)
    path = tmp_path / "m.safetensors"
    path.write_bytes(buffer.getvalue())
    loaded = load(buffer.getvalue())
    np.testing.assert_array_equal(loaded["b"], arrays[0])
    assert read_manifest(path) == sorted(order, key=lambda s: s.name)
    assert read_layout(path)[1] == order
    for (spec, value), expected in zip(iter_tensors(path), arrays, strict=True):
        assert spec in order
        np.testing.assert_array_equal(value, expected)
    chunks = list(iter_file_chunks(path, offset=10, chunk_bytes=16))
    assert chunks[0].offset == 10 and b"".join(c.data for c in chunks) == path.read_bytes()[10:]


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write(b"half")
        raise RuntimeError("crash")
    assert not target.exists() and not list(tmp_path.iterdir())
    with atomic_write(target) as f:
        f.write(b"whole")
    assert target.read_bytes() == b"whole"
    assert sha256_file(target) == hashlib.sha256(b"whole").hexdigest()
