"""The CKKS codec: round trips, weighted sums under encryption, and every refusal the silos and coordinator make."""

from __future__ import annotations

import gc
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tenseal as ts
from safetensors import safe_open

from coordinator.artifacts import Artifacts
from coordinator.secure_aggregation import THREADS, CkksContexts
from fedmeki_core.errors import InvalidInputError, InvalidUpdateError
from fedmeki_core.jobspec import PrivacySpec
from fedmeki_core.privacy.he import (
    SLOTS,
    AggregateCheckError,
    CkksContext,
    add_ciphertext_files,
    decrypt_mean,
    encrypt_file,
    generate_context,
    load_public_context,
    public_bytes,
    read_ciphertext_header,
    read_secret_context,
    verify_ciphertext_file,
    write_key_files,
)
from fedmeki_core.privacy.he.encoding import EncryptedTensor, metadata
from fedmeki_core.wire import TensorSpec, safetensors_header

MAX_NORM = PrivacySpec().ckks_max_norm  # the jobs' default bound on the decrypted mean delta

# Sizes below, at and above one ciphertext's 4096 slots, none of them a multiple past the first.
MANIFEST = [
    TensorSpec("bias", "F32", (3,)),
    TensorSpec("block.weight", "F32", (4096,)),
    TensorSpec("embed", "F32", (3, 4097)),
    TensorSpec("head", "F32", (2, 5, 1000)),
]


@pytest.fixture(scope="module")
def context() -> CkksContext:
    return generate_context()


@pytest.fixture(scope="module")
def public(context: CkksContext) -> CkksContext:
    return load_public_context(public_bytes(context))


def random_delta(seed: int, scale: float = 0.1) -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    return {spec.name: (rng.standard_normal(spec.shape) * scale).astype(np.float32) for spec in MANIFEST}


def encrypt(path: Path, context: CkksContext, delta: dict[str, np.ndarray[Any, Any]], weight: float = 1.0) -> Path:
    encrypt_file(path, context, MANIFEST, (delta[spec.name] for spec in MANIFEST), weight)
    return path


def test_a_round_trip_stays_within_1e_6(tmp_path: Path, context: CkksContext, public: CkksContext) -> None:
    delta = random_delta(0)
    update = encrypt(tmp_path / "update.ckks", context, delta)
    verify_ciphertext_file(public, update, MANIFEST)
    aggregate = tmp_path / "aggregate.ckks"
    add_ciphertext_files(aggregate, public, [update], MANIFEST, total_weight=1.0)
    decrypted = decrypt_mean(context, aggregate, MANIFEST, MAX_NORM)
    for spec in MANIFEST:
        assert decrypted[spec.name].shape == spec.shape and decrypted[spec.name].dtype == np.float32
        assert np.abs(decrypted[spec.name] - delta[spec.name]).max() < 1e-6
    header = read_ciphertext_header(update)
    counts = {t.name: t.ciphertexts for t in header.tensors}
    assert counts == {"bias": 1, "block.weight": 1, "embed": 4, "head": 3}  # ceil(size / 4096)


def test_three_silos_weighted_sum_equals_the_weighted_mean(
    tmp_path: Path, context: CkksContext, public: CkksContext
) -> None:
    deltas = [random_delta(seed) for seed in (1, 2, 3)]
    samples = [120, 45, 300]  # each silo scales its delta by its sample count before encrypting
    updates = [
        encrypt(tmp_path / f"silo{i}.ckks", context, delta, n)
        for i, (delta, n) in enumerate(zip(deltas, samples, strict=True))
    ]
    aggregate = tmp_path / "aggregate.ckks"
    add_ciphertext_files(aggregate, public, updates, MANIFEST, total_weight=float(sum(samples)))
    header = read_ciphertext_header(aggregate)
    assert header.total_weight == sum(samples) and header.updates == 3
    mean = decrypt_mean(context, aggregate, MANIFEST, MAX_NORM)
    for spec in MANIFEST:
        expected = sum(n * d[spec.name].astype(np.float64) for n, d in zip(samples, deltas, strict=True)) / sum(samples)
        assert np.abs(mean[spec.name] - expected).max() < 1e-6


def test_the_sum_is_the_same_bits_in_any_order(tmp_path: Path, context: CkksContext, public: CkksContext) -> None:
    updates = [encrypt(tmp_path / f"silo{i}.ckks", context, random_delta(i), 10 + i) for i in range(3)]
    first, second = tmp_path / "a.ckks", tmp_path / "b.ckks"
    add_ciphertext_files(first, public, updates, MANIFEST, 33.0)
    add_ciphertext_files(second, public, updates[::-1], MANIFEST, 33.0)
    assert first.read_bytes() == second.read_bytes()


def test_the_coordinator_context_is_public_only(context: CkksContext, public: CkksContext, tmp_path: Path) -> None:
    assert context.is_secret and not public.is_secret
    assert public.fingerprint == context.fingerprint
    vector = ts.ckks_vector(public.context, [1.0, 2.0])
    with pytest.raises(ValueError, match="secret"):
        vector.decrypt()
    update = encrypt(tmp_path / "update.ckks", context, random_delta(0))
    add_ciphertext_files(tmp_path / "aggregate.ckks", public, [update], MANIFEST, 1.0)
    with pytest.raises(InvalidUpdateError, match="secret"):
        decrypt_mean(public, tmp_path / "aggregate.ckks", MANIFEST, MAX_NORM)
    from fedmeki_core.privacy.he.keys import secret_bytes

    with pytest.raises(InvalidInputError, match="holds a secret key"):
        load_public_context(secret_bytes(context))


def test_key_files_give_every_silo_the_same_context(tmp_path: Path) -> None:
    made = write_key_files(tmp_path / "keys")
    silo = read_secret_context(tmp_path / "keys" / "secret.ckks")
    coordinator = load_public_context((tmp_path / "keys" / "public.ckks").read_bytes())
    assert silo.fingerprint == coordinator.fingerprint == made.fingerprint
    assert (tmp_path / "keys" / "secret.ckks").stat().st_mode & 0o777 == 0o600
    with pytest.raises(InvalidInputError, match="never overwritten"):
        write_key_files(tmp_path / "keys")
    with pytest.raises(InvalidInputError, match="no secret key"):
        read_secret_context(tmp_path / "keys" / "public.ckks")


def test_other_parameters_are_refused() -> None:
    other = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    other.global_scale = 2.0**40
    with pytest.raises(InvalidInputError, match="parameters"):
        load_public_context(other.serialize(save_secret_key=False))
    with pytest.raises(InvalidInputError, match="not a TenSEAL context"):
        load_public_context(b"not a context")


def test_a_fingerprint_mismatch_is_refused(tmp_path: Path, context: CkksContext, public: CkksContext) -> None:
    stranger = generate_context()
    ours = encrypt(tmp_path / "ours.ckks", context, random_delta(0))
    theirs = encrypt(tmp_path / "theirs.ckks", stranger, random_delta(1))
    with pytest.raises(InvalidUpdateError, match="made under CKKS context"):
        verify_ciphertext_file(public, theirs, MANIFEST)
    with pytest.raises(InvalidUpdateError, match="made under CKKS context"):
        add_ciphertext_files(tmp_path / "sum.ckks", public, [ours, theirs], MANIFEST, 2.0)


def test_a_manifest_mismatch_is_refused(tmp_path: Path, context: CkksContext, public: CkksContext) -> None:
    update = encrypt(tmp_path / "update.ckks", context, random_delta(0))
    with pytest.raises(InvalidUpdateError, match="missing tensor 'extra'"):
        verify_ciphertext_file(public, update, [*MANIFEST, TensorSpec("extra", "F32", (2,))])
    with pytest.raises(InvalidUpdateError, match="'head' is F32 \\[2, 5, 1000\\], the manifest says F32 \\[10000\\]"):
        verify_ciphertext_file(public, update, [*MANIFEST[:3], TensorSpec("head", "F32", (10000,))])


def test_a_ciphertext_under_a_foreign_key_is_caught_by_the_silos(
    tmp_path: Path, context: CkksContext, public: CkksContext
) -> None:
    """Same parameters and a forged fingerprint: nothing but decryption can tell, and the sum explodes."""
    stranger = generate_context()
    forged = CkksContext(stranger.context, context.fingerprint)
    honest = [encrypt(tmp_path / f"silo{i}.ckks", context, random_delta(i)) for i in range(2)]
    foreign = encrypt(tmp_path / "foreign.ckks", forged, random_delta(2))
    verify_ciphertext_file(public, foreign, MANIFEST)  # the coordinator cannot see it
    aggregate = tmp_path / "aggregate.ckks"
    add_ciphertext_files(aggregate, public, [*honest, foreign], MANIFEST, 3.0)
    with pytest.raises(AggregateCheckError, match="L2 norm") as caught:
        decrypt_mean(context, aggregate, MANIFEST, MAX_NORM)
    norm = float(str(caught.value).split("L2 norm ")[1].split(",")[0])
    assert norm > 1e9  # garbage of ~1e7 per value, not a plausible model update


def _file_with_blob(path: Path, fingerprint: str, blob: bytes) -> Path:
    """A ciphertext file for a 3-value tensor whose single ciphertext is `blob` (written by hand)."""
    tensor = EncryptedTensor("bias", "F32", (3,))
    path.write_bytes(
        safetensors_header([TensorSpec("bias/0", "U8", (len(blob),))], metadata([tensor], fingerprint)) + blob
    )
    return path


def test_an_empty_ciphertext_is_refused(tmp_path: Path, context: CkksContext, public: CkksContext) -> None:
    manifest = MANIFEST[:1]
    empty = _file_with_blob(tmp_path / "empty.ckks", context.fingerprint, b"")
    with pytest.raises(InvalidUpdateError, match="ciphertext 'bias/0' is empty \\(0 bytes\\)"):
        verify_ciphertext_file(public, empty, manifest)
    with pytest.raises(InvalidUpdateError, match="empty"):
        add_ciphertext_files(tmp_path / "sum.ckks", public, [empty], manifest, 1.0)
    # Non-empty bytes that TenSEAL reads as a size-0 vector: a real ciphertext whose size field says 0.
    real = bytes(ts.ckks_vector(context.context, [1.0, 2.0, 3.0]).serialize())
    assert real[:3] == b"\n\x01\x03"  # CKKSVectorProto field 1 (sizes), one value: 3
    zero = _file_with_blob(tmp_path / "zero.ckks", context.fingerprint, b"\n\x01\x00" + real[3:])
    with pytest.raises(InvalidUpdateError, match="holds 0 values, expected 3 \\(a size-0 vector: refused\\)"):
        verify_ciphertext_file(public, zero, manifest)


def test_truncated_or_garbage_ciphertexts_are_refused(
    tmp_path: Path, context: CkksContext, public: CkksContext
) -> None:
    manifest = MANIFEST[:1]
    garbage = _file_with_blob(tmp_path / "garbage.ckks", context.fingerprint, b"\x00" * 64)
    with pytest.raises(InvalidUpdateError, match="not a CKKS vector of this context"):
        verify_ciphertext_file(public, garbage, manifest)
    update = encrypt(tmp_path / "update.ckks", context, random_delta(0))
    data = update.read_bytes()
    (tmp_path / "cut.ckks").write_bytes(data[: len(data) - 100])
    with pytest.raises(InvalidUpdateError, match="file ends inside ciphertext"):
        verify_ciphertext_file(public, tmp_path / "cut.ckks", MANIFEST)


def test_silos_refuse_values_outside_the_ckks_range(tmp_path: Path, context: CkksContext) -> None:
    delta = random_delta(0)
    with pytest.raises(InvalidUpdateError, match="exceeds 65536"):
        encrypt(tmp_path / "big.ckks", context, delta, weight=1e7)
    delta["bias"][0] = math.nan
    with pytest.raises(InvalidUpdateError, match="non-finite"):
        encrypt(tmp_path / "nan.ckks", context, delta)


def test_the_encoding_is_plain_safetensors_of_protobuf_ciphertexts(
    tmp_path: Path, context: CkksContext, public: CkksContext
) -> None:
    """No pickle: any safetensors reader opens it, and its bytes are the header plus TenSEAL protobufs, nothing else."""
    update = encrypt(tmp_path / "update.ckks", context, random_delta(0))
    with safe_open(str(update), framework="np") as f:
        meta = f.metadata()
        names = list(f.keys())
        blobs = {name: f.get_tensor(name) for name in names}
    assert set(meta) == {"format", "context_sha256", "tensors"}
    assert meta["format"] == "fedmeki-ckks/1" and meta["context_sha256"] == context.fingerprint
    described = json.loads(meta["tensors"])
    assert described[2] == {"name": "embed", "dtype": "F32", "shape": [3, 4097], "slots": SLOTS, "ciphertexts": 4}
    assert sorted(names) == sorted(f"{t['name']}/{k}" for t in described for k in range(t["ciphertexts"]))
    header_end = 8 + int.from_bytes(update.read_bytes()[:8], "little")
    assert header_end + sum(blob.nbytes for blob in blobs.values()) == update.stat().st_size
    for blob in blobs.values():
        assert blob.dtype == np.uint8
        ts.ckks_vector_from(public.context, blob.tobytes())  # each blob is a CKKSVectorProto


def job_context_of(data: bytes) -> CkksContext:
    """A submitted job's public context, parsed as the coordinator parses it."""
    return load_public_context(data, n_threads=THREADS)


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_the_coordinator_keeps_few_contexts_and_one_thread_each(tmp_path: Path, context: CkksContext) -> None:
    """Each context TenSEAL parses starts a thread per CPU, for its life: the coordinator once kept every job's."""
    data = public_bytes(context)
    gc.collect()
    before = _threads()
    contexts = CkksContexts(Artifacts(tmp_path), limit=2)
    for job in ("a", "b", "c", "d"):
        (tmp_path / "checkpoints" / job).mkdir(parents=True)
        contexts.save(job, job_context_of(data), data)
    parsed = [contexts.get(job) for job in ("a", "b", "c", "d", "a")]
    del parsed
    gc.collect()
    assert contexts.parsed == 2
    assert _threads() - before <= 2  # two contexts kept, one thread each
    assert contexts.get("b").fingerprint == context.fingerprint  # dropped, parsed again from its file
