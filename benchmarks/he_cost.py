"""What CKKS secure aggregation costs: encrypt, check, add, decrypt seconds and bytes on the wire.

    python -m benchmarks.he_cost --params-list 1M,10M,demo --silos 3      (or: fedmeki bench he ...)

For each size, N silos encrypt a random float32 delta scaled by their sample count (one after the other here;
in a federation each silo encrypts its own in parallel, so the per-silo figure is what a round waits for), the
coordinator checks each upload and adds them with the public context only, and one silo decrypts the sum and
divides by the total weight. `demo` is the exchanged tensors of `fedmeki demo`'s model (their real shapes).
Bytes on the wire per silo and round: its ciphertext upload plus the encrypted aggregate it downloads, against a
float32 delta up and a float32 checkpoint down.

The same encrypted deltas then go round the cyclic mode's ring (`privacy.secure_aggregation: cyclic`): the first
silo masks its ciphertexts, each next one adds its own to the running sum, the first removes the mask, and the
coordinator checks every hop and gives the last one the total weight; one silo decrypts. Wall time per round here
is the critical path without the network: star = encrypt + check + add + decrypt; ring = encrypt + mask + each
hop's check and add in turn + unmask + check + wrap + decrypt. Silo CPU is the busiest silo's seconds (encrypt,
its ring work, decrypt). Transfers count the upload and download streams of a round. Ends with one JSON line of the
figures.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.counts import parse_count
from fedmeki_core.jobspec import PrivacySpec
from fedmeki_core.privacy.he import (
    add_ciphertext_files,
    decrypt_mean,
    encrypt_file,
    generate_context,
    load_public_context,
    public_bytes,
    verify_ciphertext_file,
)
from fedmeki_core.privacy.he.cyclic import add_to_running_sum, new_mask_seed, shift_by_mask
from fedmeki_core.wire import TensorSpec, safetensors_header

_SAMPLES = (900, 600, 400, 700, 500, 800, 300, 1000)  # the demo's silo sizes: the weights of the mean


def demo_manifest() -> list[TensorSpec]:
    """The tensors `fedmeki demo` (the vitals workload) exchanges, from its model."""
    from fedmeki_core.app.demo import TASK
    from fedmeki_core.jobspec import parse_job_spec
    from fedmeki_core.models.build import build_job_model, exchanged_state

    model = build_job_model(parse_job_spec({"name": "demo", "task": TASK, "rounds": 1}))
    return [TensorSpec(name, "F32", tuple(t.shape)) for name, t in sorted(exchanged_state(model).items())]


def synthetic_manifest(params: int, tensors: int) -> list[TensorSpec]:
    tensors = max(1, min(tensors, params))
    sizes = [params // tensors + (1 if i < params % tensors else 0) for i in range(tensors)]
    return [TensorSpec(f"layers.{i:04d}.weight", "F32", (size,)) for i, size in enumerate(sizes)]


def _delta(manifest: list[TensorSpec], seed: int) -> Iterator[np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    for spec in manifest:
        yield (rng.standard_normal(spec.shape) * 0.01).astype(np.float32)


def measure(label: str, manifest: list[TensorSpec], silos: int, work: Path) -> dict[str, Any]:
    context = generate_context()  # at the silos
    public = load_public_context(public_bytes(context))  # what the coordinator holds
    params = sum(math.prod(spec.shape) for spec in manifest)
    weights = [float(_SAMPLES[i % len(_SAMPLES)]) for i in range(silos)]
    updates, encrypt_s = [], []
    for index, weight in enumerate(weights):
        path = work / f"silo-{index}.ckks"
        started = time.perf_counter()
        encrypt_file(path, context, manifest, _delta(manifest, index), weight)
        encrypt_s.append(time.perf_counter() - started)
        updates.append(path)
    started = time.perf_counter()
    for path in updates:
        verify_ciphertext_file(public, path, manifest)
    check_s = (time.perf_counter() - started) / silos
    aggregate = work / "aggregate.ckks"
    started = time.perf_counter()
    add_ciphertext_files(aggregate, public, updates, manifest, sum(weights))
    aggregate_s = time.perf_counter() - started
    started = time.perf_counter()
    mean = decrypt_mean(context, aggregate, manifest, PrivacySpec().ckks_max_norm)
    decrypt_s = time.perf_counter() - started
    error = 0.0
    expected = [_delta(manifest, index) for index in range(silos)]
    for spec in manifest:
        truth = sum(w * next(d).astype(np.float64) for w, d in zip(weights, expected, strict=True)) / sum(weights)
        error = max(error, float(np.abs(mean[spec.name] - truth).max()))
    plain = len(safetensors_header(manifest)) + 4 * params  # a float32 delta (and checkpoint) as safetensors
    upload = updates[0].stat().st_size
    download = aggregate.stat().st_size
    decrypted = (context, decrypt_s, mean)
    ring = _ring(manifest, updates, weights, work, public, decrypted)
    for path in [*updates, aggregate]:
        path.unlink()
    star_wall = max(encrypt_s) + check_s + aggregate_s + decrypt_s  # a round waits for the slowest silo
    return {
        "label": label,
        "params": params,
        "tensors": len(manifest),
        "silos": silos,
        "encrypt_s_per_silo": sum(encrypt_s) / silos,
        "encrypt_floats_per_s": params / (sum(encrypt_s) / silos),
        "check_s_per_upload": check_s,
        "aggregate_s": aggregate_s,
        "decrypt_s": decrypt_s,
        "upload_bytes": upload,
        "aggregate_bytes": download,
        "plaintext_bytes": plain,
        "expansion": upload / plain,
        "wire_bytes_per_silo": upload + download,
        "plaintext_wire_bytes_per_silo": 2 * plain,
        "max_abs_error": error,
        "star_transfers": 2 * silos,
        "star_wire_bytes": silos * (upload + download),
        "star_wall_s": star_wall,
        "star_silo_cpu_s": max(encrypt_s) + decrypt_s,
        "ring_transfers": 3 * silos + 1,  # K+1 hop uploads, K hop downloads, K aggregate downloads
        "ring_sequential_transfers": 2 * silos + 1,  # hop 1 up, then each next hop down and up, in turn
        "ring_wire_bytes": ring["hop_bytes"] + silos * ring["aggregate_bytes"],
        "ring_wall_s": max(encrypt_s) + ring["path_s"] + decrypt_s,
        "ring_silo_cpu_s": max(e + w for e, w in zip(encrypt_s, ring["silo_s"], strict=True)) + decrypt_s,
        "ring_max_abs_error": ring["error"],
    }


def _ring(
    manifest: list[TensorSpec],
    updates: list[Path],
    weights: list[float],
    work: Path,
    public: Any,
    decrypted: tuple[Any, float, dict[str, np.ndarray[Any, Any]]],
) -> dict[str, Any]:
    """The cyclic mode on the same encrypted deltas: seconds on the round's critical path after encryption (without
    decrypting), each silo's seconds of ring work, bytes of all hop transfers, and the result against the star's."""
    context, _, star_mean = decrypted
    seed = new_mask_seed()
    silo_s = [0.0] * len(updates)
    hops = [work / f"hop-{i}.ckks" for i in range(len(updates) + 1)]
    started = time.perf_counter()
    shift_by_mask(hops[0], context, updates[0], manifest, seed, 1)
    silo_s[0] += time.perf_counter() - started
    path_s = silo_s[0]
    for index in range(1, len(updates) + 1):
        started = time.perf_counter()
        verify_ciphertext_file(public, hops[index - 1], manifest)  # the coordinator, before it relays the hop
        path_s += time.perf_counter() - started
        started = time.perf_counter()
        if index < len(updates):
            add_to_running_sum(hops[index], context, hops[index - 1], updates[index], manifest)
        else:
            shift_by_mask(hops[index], context, hops[index - 1], manifest, seed, -1)
        took = time.perf_counter() - started
        silo_s[index % len(updates)] += took
        path_s += took
    started = time.perf_counter()
    verify_ciphertext_file(public, hops[-1], manifest)
    aggregate = work / "ring-aggregate.ckks"
    add_ciphertext_files(aggregate, public, [hops[-1]], manifest, sum(weights))  # the total weight in its header
    path_s += time.perf_counter() - started
    mean = decrypt_mean(context, aggregate, manifest, PrivacySpec().ckks_max_norm)
    error = max(float(np.abs(mean[name] - star_mean[name]).max()) for name in mean)
    # Hops 1..K go up and come down once each (to the next silo; hop K to the initiator); hop K+1 only goes up.
    hop_bytes = 2 * sum(path.stat().st_size for path in hops[:-1]) + hops[-1].stat().st_size
    aggregate_bytes = aggregate.stat().st_size
    for path in [*hops, aggregate]:
        path.unlink()
    return {
        "path_s": path_s,
        "silo_s": silo_s,
        "hop_bytes": hop_bytes,
        "aggregate_bytes": aggregate_bytes,
        "error": error,
    }


def report(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'model':>8} {'params':>10} {'encrypt s/silo':>14} {'check s':>8} {'add s':>7} {'decrypt s':>9} "
        f"{'upload':>10} {'float32':>10} {'expansion':>9} {'max error':>9}"
    )
    for r in rows:
        print(
            f"{r['label']:>8} {r['params']:>10,} {r['encrypt_s_per_silo']:>14.2f} {r['check_s_per_upload']:>8.2f} "
            f"{r['aggregate_s']:>7.2f} {r['decrypt_s']:>9.2f} {r['upload_bytes'] / 2**20:>7.1f} MiB "
            f"{r['plaintext_bytes'] / 2**20:>6.1f} MiB {r['expansion']:>8.2f}x {r['max_abs_error']:>9.1e}"
        )
    print(
        f"\n{'model':>8} {'mode':>6} {'transfers':>9} {'in turn':>7} {'bytes moved':>12} {'wall s':>7} "
        f"{'silo CPU s':>10} {'vs star':>12}"
    )
    for r in rows:
        for mode, in_turn in (("star", 2), ("ring", r["ring_sequential_transfers"])):
            print(
                f"{r['label']:>8} {mode:>6} {r[f'{mode}_transfers']:>9} {in_turn:>7} "
                f"{r[f'{mode}_wire_bytes'] / 2**20:>8.1f} MiB {r[f'{mode}_wall_s']:>7.2f} "
                f"{r[f'{mode}_silo_cpu_s']:>10.2f} "
                + (f"{r['ring_max_abs_error']:>12.1e}" if mode == "ring" else f"{'':>12}")
            )
    print(json.dumps(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fedmeki bench he", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params-list", default="1M,10M,demo", help="comma-separated counts (1M, 0.1M) or demo")
    parser.add_argument("--silos", type=int, default=3)
    parser.add_argument("--tensors", type=int, default=16, help="tensors of the synthetic models")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedmeki-he-") as work:
        for item in args.params_list.split(","):
            manifest = demo_manifest() if item == "demo" else synthetic_manifest(parse_count(item), args.tensors)
            rows.append(measure(item, manifest, args.silos, Path(work)))
    report(rows)


if __name__ == "__main__":
    main()
