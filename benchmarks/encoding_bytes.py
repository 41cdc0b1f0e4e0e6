"""Bytes per upload, one round's error and encode/decode time of each delta encoding on one model's delta.

The delta is written as a silo writes it (`encoded_manifest`, `encode_tensor`, `write_safetensors`) and read back
as the coordinator folds it (`iter_deltas`), so the bytes are the update's whole file, header included. The
relative error is ||decoded - delta|| / ||delta|| for one round without error feedback (feedback sends the rest
in later rounds). Times are for the whole model on this machine, float32's in the same run as the baseline.

    python -m benchmarks.encoding_bytes --params 1M
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.counts import parse_count
from fedmeki_core.encodings import DeltaEncoding, EncodedPart, encode_tensor, encoded_manifest, iter_deltas
from fedmeki_core.wire import TensorSpec, write_safetensors

ENCODINGS = [
    DeltaEncoding("float32"),
    DeltaEncoding("bfloat16"),
    DeltaEncoding("float16"),
    DeltaEncoding("int8", 64),
    DeltaEncoding("int8", 128),
    DeltaEncoding("int8", 256),
    DeltaEncoding("topk", topk_fraction=0.1),
    DeltaEncoding("topk", topk_fraction=0.01),
]


def model_manifest(params: int) -> list[TensorSpec]:
    """512 x 512 weight matrices with their biases, like an MLP's layers, and a head of the rest: `params` values."""
    width = 512
    specs = []
    for layer in range(params // (width * width + width)):
        specs.append(TensorSpec(f"layer{layer}.weight", "F32", (width, width)))
        specs.append(TensorSpec(f"layer{layer}.bias", "F32", (width,)))
    rest = params - len(specs) // 2 * (width * width + width)
    if rest:
        specs.append(TensorSpec("head.weight", "F32", (rest,)))
    return specs


def _encoded(values: np.ndarray, part: TensorSpec, encoding: DeltaEncoding) -> tuple[list[np.ndarray], np.ndarray]:
    if isinstance(part, EncodedPart):
        return encode_tensor(values, part, encoding)
    if part.dtype == "BF16":
        bits = (values.view(np.uint32) + 0x7FFF + ((values.view(np.uint32) >> 16) & 1)) >> 16  # round to nearest even
        stored = bits.astype(np.uint16)
        return [stored], (stored.astype(np.uint32) << 16).view(np.float32)
    if part.dtype == "F16":
        half = values.astype(np.float16)
        return [half], half.astype(np.float32)
    return [values], values


def measure(manifest: list[TensorSpec], encoding: DeltaEncoding, folder: Path, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    deltas = {s.name: (rng.normal(size=s.shape) * 1e-3).astype(np.float32) for s in manifest}
    wire = encoded_manifest(manifest, encoding)
    parts = {part.name: part for part in wire}
    path = folder / f"{encoding.name}.safetensors"
    started = time.perf_counter()
    arrays: list[np.ndarray] = []
    error = norm = 0.0
    for spec in manifest:
        encoded, sent = _encoded(deltas[spec.name], parts[spec.name], encoding)
        arrays += encoded
        error += float(np.sum((sent.astype(np.float64) - deltas[spec.name]) ** 2))
        norm += float(np.sum(deltas[spec.name].astype(np.float64) ** 2))
    with path.open("wb") as f:
        write_safetensors(f, wire, arrays)
    encoded_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in iter_deltas(path, manifest, encoding):
        pass
    decoded_s = time.perf_counter() - started
    return {"bytes": path.stat().st_size, "error": (error / norm) ** 0.5, "encode_s": encoded_s, "decode_s": decoded_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=parse_count, default=parse_count("1M"), help="model size, e.g. 1M, 10M")
    args = parser.parse_args(argv)
    manifest = model_manifest(args.params)
    params = sum(int(np.prod(s.shape)) for s in manifest)
    print(f"{params:,} parameters in {len(manifest)} tensors")
    print(f"{'encoding':<16} {'bytes':>12} {'x float32':>10} {'rel. error':>11} {'encode s':>9} {'decode s':>9}")
    with tempfile.TemporaryDirectory() as folder:
        baseline = 0.0
        for encoding in ENCODINGS:
            result = measure(manifest, encoding, Path(folder), seed=1)
            baseline = baseline or result["bytes"]
            label = encoding.name + (
                f" B={encoding.block_size}"
                if encoding.name == "int8"
                else f" {encoding.topk_fraction:.0%}"
                if encoding.name == "topk"
                else ""
            )
            print(
                f"{label:<16} {int(result['bytes']):>12,} {result['bytes'] / baseline:>10.4f} "
                f"{result['error']:>11.2e} {result['encode_s']:>9.3f} {result['decode_s']:>9.3f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
