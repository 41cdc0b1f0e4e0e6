"""A pretrained base in a local `save_pretrained` folder: safetensors only, and its fingerprint over the tensors.

The fingerprint is the sha256 of, for each tensor of the folder's `*.safetensors` files in sorted name order:
the name, the dtype and the shape as one line `name\\tDTYPE\\td0,d1,...\\n`, then the tensor's raw bytes. It does not
depend on how the tensors are split into shards or ordered in a file, nor on the files' metadata. No torch here:
the researcher's client and the silos compute it by reading the files in bounded chunks.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

from fedmeki_core.errors import FedmekiError, InvalidInputError
from fedmeki_core.wire import HEADER_PREFIX_BYTES, read_header

# Files whose format is Python's pickle (PyTorch's torch.save, TensorFlow/Keras checkpoints are not read either).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_READ_BYTES = 4 << 20


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offsets in the file
    end: int


def safetensors_files(folder: Path) -> list[Path]:
    """The folder's weight files, after checking it is a model folder without pickle weights."""
    if not folder.is_dir():
        raise InvalidInputError(f"{folder} is not a folder")
    if not (folder / "config.json").is_file():
        raise InvalidInputError(f"{folder} is not a save_pretrained folder (no config.json)")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise InvalidInputError(
            f"{folder} holds pickle weights ({', '.join(pickles[:3])}): only safetensors are loaded"
        )
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InvalidInputError(f"{folder} holds no .safetensors weights")
    return files


def _entries(files: list[Path]) -> dict[str, _Entry]:
    entries: dict[str, _Entry] = {}
    for file in files:
        try:
            header = read_header(file)
            with file.open("rb") as f:
                (length,) = struct.unpack("<Q", f.read(HEADER_PREFIX_BYTES))
            size = file.stat().st_size
            data = HEADER_PREFIX_BYTES + length
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                if name in entries:
                    raise InvalidInputError(f"tensor {name!r} is in two files ({entries[name].file.name}, {file.name})")
                begin, end = (int(v) for v in entry["data_offsets"])
                if not 0 <= begin <= end <= size - data:
                    raise InvalidInputError(f"{file.name}: tensor {name!r} lies outside the file")
                shape = tuple(int(d) for d in entry["shape"])
                entries[name] = _Entry(file, str(entry["dtype"]), shape, data + begin, data + end)
        except InvalidInputError:
            raise
        except (FedmekiError, OSError, KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"{file}: not a readable safetensors file ({exc})") from None
    return entries


def fingerprint(folder: Path) -> str:
    """The base's fingerprint (hex sha256), after the checks of `safetensors_files`."""
    digest = hashlib.sha256()
    entries = _entries(safetensors_files(folder))
    for name in sorted(entries):
        entry = entries[name]
        digest.update(f"{name}\t{entry.dtype}\t{','.join(map(str, entry.shape))}\n".encode())
        with entry.file.open("rb") as f:
            f.seek(entry.start)
            left = entry.end - entry.start
            while left:
                block = f.read(min(left, _READ_BYTES))
                if not block:
                    raise InvalidInputError(f"{entry.file}: ends inside tensor {name!r}")
                digest.update(block)
                left -= len(block)
    return digest.hexdigest()
