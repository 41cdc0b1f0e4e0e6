"""Hostile UploadUpdate streams for the fuzzer: each case is a broken variant of one honest update of the small
manifest of `tests/silo_wire.py`, with the status the coordinator must answer.

`make_case(rng, job_id, round_number)` picks one kind of damage and its parameters from a seeded
`random.Random`; the bytes it produces are always invalid (no variant here can turn into a valid update).
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from fedmeki_core.proto.v1 import common_pb2, silo_pb2
from fedmeki_core.wire import LOCAL_STEPS_KEY
from tests.silo_wire import MANIFEST

INVALID = grpc.StatusCode.INVALID_ARGUMENT
TOO_LARGE = grpc.StatusCode.RESOURCE_EXHAUSTED
NOT_NOW = grpc.StatusCode.FAILED_PRECONDITION

Entries = list[tuple[str, Any]]  # header entries in order; a list, so that names can repeat


@dataclass
class Update:
    """An update as tensors and header entries, before it is serialised (and broken)."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def entries(self) -> Entries:
        entries: Entries = []
        offset = 0
        for name, array in self.arrays.items():
            entries.append(
                (name, {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]})
            )
            offset += array.nbytes
        return entries

    def data(self) -> bytes:
        return b"".join(array.tobytes() for array in self.arrays.values())


def honest_update(rng: random.Random) -> Update:
    values = np.random.default_rng(rng.randrange(1 << 32))
    return Update({name: values.normal(size=shape).astype(dtype) for name, (shape, dtype) in MANIFEST.items()})


def header_json(entries: Entries) -> bytes:
    """The JSON of `entries` as written, repeated names included."""
    return ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in entries) + "}").encode()


def framed(header: bytes, data: bytes, length: int | None = None) -> bytes:
    """8-byte length prefix (the true one unless `length` lies), the header padded to 8 bytes, the data."""
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header) if length is None else length) + header + data


@dataclass
class Case:
    kind: str
    messages: list[silo_pb2.UploadUpdateRequest]
    code: grpc.StatusCode
    text: str = ""  # a fragment the status details must contain ("" when several checks may fire first)


def _header(payload: bytes, fields: dict[str, Any]) -> silo_pb2.UploadUpdateRequest:
    """The header of an honest upload of `payload`, with `fields` (job_id and round at least) over it."""
    values: dict[str, Any] = {
        "num_samples": 10,
        "encoding": "safetensors",
        "total_size": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "metrics": common_pb2.Metrics(values={"eval_accuracy": 0.5}),
        **fields,
    }
    return silo_pb2.UploadUpdateRequest(header=silo_pb2.UpdateHeader(**values))


def _chunk(offset: int, data: bytes) -> silo_pb2.UploadUpdateRequest:
    return silo_pb2.UploadUpdateRequest(chunk=common_pb2.Chunk(offset=offset, data=data))


def chunked(rng: random.Random, payload: bytes) -> list[tuple[int, bytes]]:
    """The payload cut at a random size (1 byte to 1 MiB; at least 64 KiB for long payloads), as (offset, data)."""
    size = rng.choice([1, 3, 7, 16, 61, 256, 1 << 20] if len(payload) < 1 << 16 else [1 << 16, 1 << 20])
    return [(start, payload[start : start + size]) for start in range(0, len(payload), size)]


def stream(rng: random.Random, payload: bytes, fields: dict[str, Any]) -> list[silo_pb2.UploadUpdateRequest]:
    return [_header(payload, fields)] + [_chunk(o, d) for o, d in chunked(rng, payload)]


# -- the kinds of damage: each returns (payload, header overrides, code, text) or a whole Case ---------------

Damage = tuple[bytes, dict[str, Any], grpc.StatusCode, str]


def header_length_lie(rng: random.Random, update: Update) -> Damage:
    header = header_json(update.entries())
    true_length = len(header) + (-len(header) % 8)
    total = 8 + true_length + len(update.data())
    lie = rng.choice(
        [
            rng.randrange(0, true_length),  # cuts into the JSON (or its padding: the data then starts early)
            rng.randrange(true_length + 1, total - 8 + 1),  # reaches into the data
            total - 8 + rng.randrange(1, 1 << 16),  # beyond the stream
            (1 << 63) + rng.randrange(1 << 20),
            (1 << 64) - 1,
        ]
    )
    return framed(header, update.data(), lie), {}, INVALID, ""


def _broken_texts(rng: random.Random, header: bytes) -> list[tuple[bytes, str]]:
    structural = [i for i, c in enumerate(header) if chr(c) in '{}[]:,"']
    position = rng.choice(structural)
    replaced = header[:position] + rng.choice([b"\x00", b"\xff", b"#"]) + header[position + 1 :]
    cut = header[: rng.randrange(1, len(header) - 1)]
    depth = rng.randrange(2_000, 20_000)
    digits = rng.randrange(5_000, 20_000)
    return [
        (replaced, "not valid JSON"),
        (cut, "not valid JSON"),
        (rng.choice([b"[]", b'"header"', b"1", b"null", b"true"]), "not a JSON object"),
        (b'{"a":' + b"[" * depth + b"]" * depth + b"}", "not valid JSON"),  # nesting beyond any parser's stack
        (b'{"a":{"dtype":"F32","shape":[' + b"9" * digits + b'],"data_offsets":[0,48]}}', "not valid JSON"),
        (header.decode().encode("utf-16"), "not valid JSON"),  # JSON, but not UTF-8 as safetensors requires
        (b"\xef\xbb\xbf" + header, "not valid JSON"),  # a byte-order mark
        (header[:-1] + b',"c":' + b'"\xc3\x28"}', "not valid JSON"),  # invalid UTF-8 in a string
    ]


def broken_json(rng: random.Random, update: Update) -> Damage:
    text, fragment = rng.choice(_broken_texts(rng, header_json(update.entries())))
    return framed(text, update.data()), {}, INVALID, fragment


def _entry(entries: Entries, name: str) -> dict[str, Any]:
    return next(value for key, value in entries if key == name)


def data_offsets(rng: random.Random, update: Update) -> Damage:
    entries = update.entries()
    name = rng.choice([key for key, _ in entries])
    begin, end = _entry(entries, name)["data_offsets"]
    shift = rng.randrange(1, 9)
    _entry(entries, name)["data_offsets"] = rng.choice(
        [
            [begin + shift, end + shift],  # a gap before it (or past the end)
            [max(0, begin - shift), end - shift] if begin else [begin + shift, end + shift],  # overlaps
            [begin, end + shift],  # longer than its shape
            [end, begin],  # reversed
            [0, 1 << 62],  # out of range
            [-4, end],
            [float(begin), float(end)],
            [str(begin), end],
            [begin],
            [begin, end, end],
            None,
            [begin, True],
        ]
    )
    return framed(header_json(entries), update.data()), {}, INVALID, ""


def duplicate_name(rng: random.Random, update: Update) -> Damage:
    entries = update.entries()
    name, entry = rng.choice(entries)
    variant = rng.randrange(4)
    if variant == 0:  # the same entry twice: the layout still tiles, a last-wins parser accepts it
        entries.insert(rng.randrange(len(entries) + 1), (name, dict(entry)))
    elif variant == 1:  # a second entry of another tensor's name pointing at this one's bytes
        other = next(key for key, _ in entries if key != name)
        entries.append((other, dict(entry)))
    elif variant == 2:  # a repeated key inside an entry
        text = header_json(entries).replace(b'"dtype": "F32"', b'"dtype": "F16", "dtype": "F32"', 1)
        assert b'"F16"' in text
        return framed(text, update.data()), {}, INVALID, "duplicate"
    else:
        entries = [("__metadata__", {"x": "1"}), *entries, ("__metadata__", {"y": "2"})]
    return framed(header_json(entries), update.data()), {}, INVALID, "duplicate"


_ITEMSIZE = {"F16": 2, "BF16": 2, "F64": 8, "I32": 4, "I64": 8, "U8": 1, "BOOL": 1}


def wrong_dtype(rng: random.Random, update: Update) -> Damage:
    name = rng.choice(list(update.arrays))
    dtype = rng.choice([*_ITEMSIZE, "F32 ", "f32", "", "float32", 32, None, ["F32"], "F\x0032", "\ud800"])
    arrays = dict(update.arrays)
    if isinstance(dtype, str) and dtype in _ITEMSIZE:  # bytes of the declared dtype: only the dtype is wrong
        count = arrays[name].size
        arrays[name] = np.zeros(count * _ITEMSIZE[dtype], np.uint8).reshape(-1)
        shaped = Update(arrays).entries()
        _entry(shaped, name)["shape"] = list(update.arrays[name].shape)
    else:
        shaped = Update(arrays).entries()
    _entry(shaped, name)["dtype"] = dtype
    return framed(header_json(shaped), Update(arrays).data()), {}, INVALID, "dtype"


def wrong_shape(rng: random.Random, update: Update) -> Damage:
    entries = update.entries()
    name = rng.choice([key for key, _ in entries])
    count = update.arrays[name].size
    same_bytes = [[count], [1, count], [count, 1], [count, 1, 1], list(reversed(update.arrays[name].shape))]
    other = [[], [count + 1], [0], [2**40], [-count], [float(count)], [str(count)], str(count), None, [True, count]]
    shape = rng.choice([s for s in same_bytes if s != list(update.arrays[name].shape)] + other)
    _entry(entries, name)["shape"] = shape
    return framed(header_json(entries), update.data()), {}, INVALID, ""


_NON_FINITE = [0x7FC00000, 0xFFC00000, 0x7F800000, 0xFF800000, 0x7F800001, 0x7FFFFFFF, 0xFFFFFFFF]


def non_finite(rng: random.Random, update: Update) -> Damage:
    name = rng.choice(list(update.arrays))
    arrays = {key: value.copy() for key, value in update.arrays.items()}
    flat = arrays[name].reshape(-1).view(np.uint32)
    flat[rng.randrange(flat.size)] = rng.choice(_NON_FINITE)
    broken = Update(arrays)
    return framed(header_json(broken.entries()), broken.data()), {}, INVALID, "NaN or Inf"


def missing_or_extra(rng: random.Random, update: Update) -> Damage:
    arrays = dict(update.arrays)
    if rng.random() < 0.4:
        del arrays[rng.choice(list(arrays))]
        text = "missing tensor"
    else:
        extra = rng.choice(["c", "", " a", "A", "a\x00", "algorithm/x/a", "__metadata", "\ud800"])
        arrays[extra] = np.zeros(rng.randrange(0, 4), np.float32)
        text = "not in the round's manifest"
    broken = Update(arrays)
    return framed(header_json(broken.entries()), broken.data()), {}, INVALID, text


def metadata(rng: random.Random, update: Update) -> Damage:
    value, text = rng.choice(
        [
            ([], "__metadata__"),
            ("fedmeki", "__metadata__"),
            (1, "__metadata__"),
            (None, "__metadata__"),
            ({"fedmeki.untrained": 1}, "__metadata__"),
            ({"fedmeki.untrained": ["a"]}, "__metadata__"),
            ({"format": 5}, "__metadata__"),
            ({"format": {"pt": "yes"}}, "__metadata__"),
            ({"format": None}, "__metadata__"),
            ({"fedmeki.untrained": "zz"}, "not in the round's manifest"),  # names must be the manifest's
            ({"fedmeki.untrained": "a\nzz"}, "not in the round's manifest"),
            ({"fedmeki.untrained": "a\x00"}, "not in the round's manifest"),
        ]
    )
    entries = [("__metadata__", value), *update.entries()]
    return framed(header_json(entries), update.data()), {}, INVALID, text


def declared_size(rng: random.Random, update: Update) -> Damage:
    payload = framed(header_json(update.entries()), update.data())
    size, code, text = rng.choice(
        [
            ((1 << 63) - 1, TOO_LARGE, "exceeds the limit"),
            (-(1 << 63), INVALID, "must be positive"),  # the int64 on the wire that reads 2^63 as unsigned
            (0, INVALID, "must be positive"),
            (-1, INVALID, "must be positive"),
            (len(payload) - rng.randrange(1, 40), INVALID, ""),
            (len(payload) + rng.randrange(1, 1000), INVALID, ""),
        ]
    )
    return payload, {"total_size": size}, code, text


def sha256_damage(rng: random.Random, update: Update) -> Damage:
    payload = framed(header_json(update.entries()), update.data())
    digest = hashlib.sha256(payload).hexdigest()
    position = rng.randrange(64)
    flipped = digest[:position] + format(int(digest[position], 16) ^ rng.randrange(1, 16), "x") + digest[position + 1 :]
    variant = rng.randrange(4)
    if variant == 0:
        return payload, {"sha256": flipped}, INVALID, "sha256 mismatch"
    if variant == 1:  # the bytes changed in flight, still finite: only the digest can tell
        arrays = {key: value.copy() for key, value in update.arrays.items()}
        name = rng.choice(list(arrays))
        arrays[name].reshape(-1)[rng.randrange(arrays[name].size)] += 1.0
        changed = Update(arrays)
        return framed(header_json(changed.entries()), changed.data()), {"sha256": digest}, INVALID, "sha256 mismatch"
    malformed = rng.choice([digest.upper(), digest[:63], digest + "0", "", "g" * 64, " " + digest[1:]])
    return payload, {"sha256": malformed}, INVALID, "64 lowercase hex"


def huge_header(rng: random.Random, update: Update) -> Damage:
    size = (1 << 20) + rng.randrange(1, 1 << 16)
    if rng.random() < 0.5:  # a real header that long: valid JSON, with a long metadata value
        entries = [("__metadata__", {"note": "x" * size}), *update.entries()]
        return framed(header_json(entries), update.data()), {}, TOO_LARGE, "exceeds the limit"
    head = struct.pack("<Q", size) + b"{" + b" " * 1000  # only the prefix says so: the stream stops early
    return head, {"total_size": size + 4096}, TOO_LARGE, "exceeds the limit"


def header_fields(rng: random.Random, update: Update) -> Damage:
    payload = framed(header_json(update.entries()), update.data())
    return rng.choice(
        [
            (
                payload,
                {"job_id": rng.choice(["", "nope", "x" * 10_000, "a\x00b", "../../etc"])},
                NOT_NOW,
                "not selected",
            ),
            (payload, {"round": rng.choice([0, -1, 2, 2**31 - 1, -(2**31)])}, NOT_NOW, "not selected"),
            (payload, {"num_samples": rng.choice([0, -1, -(2**63), 2**63 - 1])}, INVALID, "num_samples"),
            (payload, {"encoding": rng.choice(["pickle", "SAFETENSORS", "safetensors\x00"])}, INVALID, "encoding"),
            (
                payload,
                {
                    "metrics": common_pb2.Metrics(
                        values={"loss": rng.choice([float("nan"), float("inf"), -float("inf")])}
                    )
                },
                INVALID,
                "must be finite",
            ),
            (
                payload,
                {
                    "metrics": common_pb2.Metrics(
                        values=rng.choice(
                            [
                                {f"m{i}": 0.5 for i in range(rng.randrange(257, 2000))},  # a flood of names
                                {"x" * rng.randrange(129, 5000): 0.5},
                                {"loss\n[INFO] forged": 0.5},
                                {"loss": rng.choice([1e13, -1e300])},
                            ]
                        )
                    )
                },
                INVALID,
                "metrics:",
            ),
            (
                framed(
                    header_json(
                        [
                            ("__metadata__", {LOCAL_STEPS_KEY: rng.choice(["9" * 400, "\u00b2", "1" * 5000, "0x10"])}),
                            *update.entries(),
                        ]
                    ),
                    update.data(),
                ),
                {},
                INVALID,
                LOCAL_STEPS_KEY,
            ),
        ]
    )


DAMAGE: dict[str, Callable[[random.Random, Update], Damage]] = {
    "header length lie": header_length_lie,
    "broken JSON": broken_json,
    "data offsets": data_offsets,
    "duplicate names": duplicate_name,
    "wrong dtype": wrong_dtype,
    "wrong shape": wrong_shape,
    "NaN/Inf": non_finite,
    "missing or extra tensor": missing_or_extra,
    "bogus __metadata__": metadata,
    "declared size": declared_size,
    "sha256": sha256_damage,
    "header over 1 MiB": huge_header,
    "header fields": header_fields,
}


def chunk_damage(rng: random.Random, job_id: str, round_number: int, update: Update) -> Case:
    payload = framed(header_json(update.entries()), update.data())
    chunks = [(o, d) for o, d in chunked(rng, payload)]
    if len(chunks) < 3:
        chunks = [(start, payload[start : start + 8]) for start in range(0, len(payload), 8)]
    index = rng.randrange(1, len(chunks))
    offset, data = chunks[index]
    variant = rng.randrange(6)
    if variant == 0:
        chunks[index] = (offset + rng.randrange(1, 9), data)  # a gap
    elif variant == 1:
        chunks[index] = (offset - rng.randrange(1, min(offset, 8) + 1), data)  # an overlap
    elif variant == 2:
        chunks.insert(index, chunks[index - 1])  # a chunk sent twice
    elif variant == 3:
        chunks[index - 1], chunks[index] = chunks[index], chunks[index - 1]  # out of order
    elif variant == 4:
        chunks[index] = (-offset - 1, data)
    else:
        chunks.append((len(payload), b"\x00" * rng.randrange(1, 9)))  # bytes past the declared size
    messages = [_header(payload, {"job_id": job_id, "round": round_number})] + [_chunk(o, d) for o, d in chunks]
    return Case("chunk gaps and overlaps", messages, INVALID, "")


def empty_stream(rng: random.Random, job_id: str, round_number: int, update: Update) -> Case:
    payload = framed(header_json(update.entries()), update.data())
    honest = stream(rng, payload, {"job_id": job_id, "round": round_number})
    variant = rng.randrange(4)
    if variant == 0:
        return Case("empty stream", [], INVALID, "must be the header")
    if variant == 1:
        return Case("empty stream", honest[:1], INVALID, "truncated")
    if variant == 2:
        return Case("empty stream", honest[1:], INVALID, "must be the header")
    return Case("empty stream", honest[:1] + honest, INVALID, "header")  # a second header among the chunks


WHOLE_STREAM: dict[str, Callable[[random.Random, str, int, Update], Case]] = {
    "chunk gaps and overlaps": chunk_damage,
    "empty stream": empty_stream,
}
KINDS = sorted(DAMAGE) + sorted(WHOLE_STREAM)


def make_case(rng: random.Random, job_id: str, round_number: int) -> Case:
    kind = rng.choice(KINDS)
    update = honest_update(rng)
    if kind in WHOLE_STREAM:
        return WHOLE_STREAM[kind](rng, job_id, round_number, update)
    payload, header, code, text = DAMAGE[kind](rng, update)
    return Case(kind, stream(rng, payload, {"job_id": job_id, "round": round_number, **header}), code, text)


# -- encoded layouts (fedmeki_core/encodings.py): int8 with 64-value blocks, topk of half the entries ------------

INT8_FIELDS = {"delta_encoding": "int8", "int8_block_size": 64}
TOPK_FIELDS = {"delta_encoding": "topk", "topk_fraction": 0.5}


def honest_int8() -> dict[str, np.ndarray]:
    """An int8 update of MANIFEST: every tensor fits one 64-value block."""
    return {
        "a": np.arange(-6, 6, dtype=np.int8).reshape(4, 3),
        "a.__scale": np.array([0.01], np.float32),
        "b": np.arange(5, dtype=np.int8),
        "b.__scale": np.array([0.02], np.float32),
    }


def honest_topk() -> dict[str, np.ndarray]:
    """A topk update of MANIFEST: 6 of a's 12 entries, 3 of b's 5."""
    return {
        "a": np.linspace(-1, 1, 6, dtype=np.float32),
        "a.__indices": np.array([0, 2, 3, 7, 9, 11], np.int32),
        "b": np.array([0.5, -0.25, 2.0], np.float32),
        "b.__indices": np.array([0, 1, 4], np.int32),
    }


def _with(update: dict[str, np.ndarray], name: str, value: np.ndarray) -> dict[str, np.ndarray]:
    return {**update, name: value}


# (kind, job spec fields, tensors, a fragment of the status details): every one INVALID_ARGUMENT
ENCODED_CASES: list[tuple[str, dict[str, Any], dict[str, np.ndarray], str]] = [
    *[
        (f"int8 scale {value}", INT8_FIELDS, _with(honest_int8(), "a.__scale", np.array([value], np.float32)), text)
        for value, text in [
            (np.nan, "NaN or Inf"),
            (np.inf, "NaN or Inf"),
            (-np.inf, "NaN or Inf"),
            (0.0, "must be positive"),
            (-0.0, "must be positive"),
            (-0.5, "must be positive"),
        ]
    ],
    ("int8 block count", INT8_FIELDS, _with(honest_int8(), "b.__scale", np.ones(2, np.float32)), "shape"),
    ("int8 no scales", INT8_FIELDS, {k: v for k, v in honest_int8().items() if k != "a.__scale"}, "missing tensor"),
    ("int8 scale dtype", INT8_FIELDS, _with(honest_int8(), "a.__scale", np.ones(1, np.float16)), "dtype"),
    ("int8 -128", INT8_FIELDS, _with(honest_int8(), "b", np.array([0, 1, -128, 3, 4], np.int8)), "-127..127"),
    ("int8 values as F32", INT8_FIELDS, _with(honest_int8(), "b", np.zeros(5, np.float32)), "dtype"),
    (
        "topk index out of range",
        TOPK_FIELDS,
        _with(honest_topk(), "a.__indices", np.array([0, 2, 3, 7, 9, 12], np.int32)),
        "not below 12",
    ),
    (
        "topk negative index",
        TOPK_FIELDS,
        _with(honest_topk(), "b.__indices", np.array([-1, 1, 4], np.int32)),
        "sorted and unique",
    ),
    (
        "topk duplicate index",
        TOPK_FIELDS,
        _with(honest_topk(), "a.__indices", np.array([0, 2, 2, 7, 9, 11], np.int32)),
        "sorted and unique",
    ),
    (
        "topk unsorted indices",
        TOPK_FIELDS,
        _with(honest_topk(), "a.__indices", np.array([0, 3, 2, 7, 9, 11], np.int32)),
        "sorted and unique",
    ),
    ("topk values too short", TOPK_FIELDS, _with(honest_topk(), "a", np.zeros(5, np.float32)), "shape"),
    ("topk indices too long", TOPK_FIELDS, _with(honest_topk(), "b.__indices", np.arange(4, dtype=np.int32)), "shape"),
    ("topk index dtype", TOPK_FIELDS, _with(honest_topk(), "b.__indices", np.array([0, 1, 4], np.int64)), "dtype"),
    (
        "topk NaN value",
        TOPK_FIELDS,
        _with(honest_topk(), "b", np.array([0.5, np.nan, 2.0], np.float32)),
        "NaN or Inf",
    ),
]


def encoded_damage(rng: random.Random) -> tuple[dict[str, Any], dict[str, np.ndarray], str]:
    """A random broken int8 or topk update of MANIFEST: (job spec fields, tensors, a fragment of the details)."""
    name = rng.choice(["a", "b"])
    if rng.random() < 0.5:
        update = honest_int8()
        if rng.random() < 0.6:
            value, text = rng.choice(
                [
                    *[(bad, "NaN or Inf") for bad in (np.nan, np.inf, -np.inf)],
                    *[(bad, "must be positive") for bad in (0.0, -0.0, -rng.uniform(1e-30, 1e30))],
                ]
            )
            update[f"{name}.__scale"] = np.array([value], np.float32)
            return INT8_FIELDS, update, text
        if rng.random() < 0.5:
            values = update[name].copy()
            values.reshape(-1)[rng.randrange(values.size)] = -128
            return INT8_FIELDS, _with(update, name, values), "-127..127"
        return INT8_FIELDS, _with(update, f"{name}.__scale", np.ones(rng.choice([0, 2, 3]), np.float32)), "shape"
    update = honest_topk()
    indices = update[f"{name}.__indices"].copy()
    numel = 12 if name == "a" else 5
    position = rng.randrange(indices.size)
    variant = rng.randrange(5)
    if variant == 0:  # out of range, at the end where sortedness still holds
        indices[-1] = rng.choice([numel, numel + 1, 2**31 - 1])
        return TOPK_FIELDS, _with(update, f"{name}.__indices", indices), f"not below {numel}"
    if variant == 1:
        indices[position] = indices[position - 1] if position else indices[1]
        return TOPK_FIELDS, _with(update, f"{name}.__indices", indices), "sorted and unique"
    if variant == 2:
        indices = indices[::-1].copy()
        return TOPK_FIELDS, _with(update, f"{name}.__indices", indices), "sorted and unique"
    if variant == 3:
        values = update[name].copy()
        values[position] = rng.choice([np.nan, np.inf, -np.inf])
        return TOPK_FIELDS, _with(update, name, values), "NaN or Inf"
    length = rng.choice([size for size in range(0, indices.size + 3) if size != indices.size])
    if rng.random() < 0.5:
        return TOPK_FIELDS, _with(update, name, np.ones(length, np.float32)), "shape"
    return TOPK_FIELDS, _with(update, f"{name}.__indices", np.arange(length, dtype=np.int32)), "shape"
