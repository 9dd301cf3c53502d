"""Read Hugging Face weight files into {key: numpy array}, with errors naming file and key.

safetensors is parsed here (8-byte header length, JSON header, raw little-endian data)
rather than through the safetensors package, so that a truncated or corrupt file reports
which tensor is damaged. PyTorch `.bin` files are read only with
`torch.load(weights_only=True)`: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from peftdebias_jax.errors import CheckpointError

SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
# JAX's CPU client uses a host array in place (no copy) when its data is aligned to this.
ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised C-contiguous array starting on an ALIGNMENT boundary (numpy's own
    are 16-byte aligned): loaded weights then reach XLA without another copy."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file, validated against the file size, each read
    into its own aligned array (see aligned_empty): once converted, a tensor can be freed
    alone, which the views of one memory map cannot."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if 8 + header_len > size:
            raise CheckpointError(
                f"{path}: truncated or corrupt safetensors file: the header claims "
                f"{header_len} bytes but the file has {size}"
            )
        raw_header = f.read(header_len)
        try:
            header = json.loads(raw_header)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: corrupt safetensors header: {err}") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header: not a JSON object")
        header.pop("__metadata__", None)
        data_start = 8 + header_len
        return {
            key: read_tensor(f, path, key, info, data_start, size) for key, info in header.items()
        }


def read_tensor(f, path: Path, key: str, info: Any, data_start: int, size: int) -> np.ndarray:
    """One tensor of an open .safetensors file, its header entry checked first."""
    try:
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(
            f"{path}: corrupt entry for tensor {key!r} in the header: {info!r}"
        ) from None
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes or begin < 0:
        raise CheckpointError(
            f"{path}: tensor {key!r} has shape {shape} ({info['dtype']}, {nbytes} bytes) "
            f"but its data offsets span {end - begin} bytes"
        )
    if data_start + end > size:
        raise CheckpointError(
            f"{path}: truncated file: tensor {key!r} needs bytes up to {data_start + end} "
            f"but the file has {size}"
        )
    if nbytes == 0:
        return np.zeros(shape, dtype)
    out = aligned_empty(shape, dtype)
    f.seek(data_start + begin)
    if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != nbytes:
        raise CheckpointError(f"{path}: truncated file: tensor {key!r} ends early")
    return out


def read_torch_bin(path: str | Path) -> dict[str, np.ndarray]:
    """A PyTorch state dict read with weights_only=True (no arbitrary unpickling)."""
    path = Path(path)
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path}: this is a PyTorch pickle checkpoint and reading it needs torch "
            "(pip install torch), or convert it to model.safetensors"
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot read the PyTorch checkpoint: {err}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    out = {}
    for key, value in state.items():
        if value.dtype == torch.bfloat16:
            value = value.float()
        out[key] = value.detach().cpu().numpy()
    return out


def weight_keys(path: Path) -> set[str]:
    """The tensor names of a weights file, read from its header or shard index only (a torch
    .bin has neither: it is loaded)."""
    name = path.name
    if name.endswith(".index.json"):
        try:
            return set(json.loads(path.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path}: not a valid shard index ({err})") from None
    if name.endswith(".safetensors"):
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", raw)
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise CheckpointError(f"{path}: corrupt safetensors header: {err}") from None
        return {k for k in header if k != "__metadata__"}
    return set(read_weights(path))


def read_sharded(index_path: Path, reader) -> dict[str, np.ndarray]:
    """Tensors of a sharded checkpoint described by an `*.index.json` weight map."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index_path}: not a valid shard index ({err})") from None
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.exists():
            raise CheckpointError(f"{index_path}: shard {shard!r} is listed but missing")
        tensors.update(reader(shard_path))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CheckpointError(f"{index_path}: keys listed but absent from their shards: {missing}")
    return tensors


def find_weights(directory: Path) -> Path:
    """The weights file of a checkpoint directory, preferring safetensors."""
    for name in WEIGHT_FILES:
        if (directory / name).exists():
            return directory / name
    present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    raise CheckpointError(
        f"{directory}: no weights found; expected one of {list(WEIGHT_FILES)}, found {present}"
    )


def read_weights(path: Path) -> dict[str, np.ndarray]:
    """Reads any supported weights file (single or sharded safetensors, or torch .bin)."""
    name = path.name
    if name.endswith(".safetensors.index.json"):
        return read_sharded(path, read_safetensors)
    if name.endswith(".bin.index.json"):
        return read_sharded(path, read_torch_bin)
    if name.endswith(".safetensors"):
        return read_safetensors(path)
    if name.endswith(".bin"):
        return read_torch_bin(path)
    raise CheckpointError(f"{path}: unsupported weights file type")
