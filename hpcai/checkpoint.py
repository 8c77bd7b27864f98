"""Restartable HDF5 checkpoints: plain datasets and attributes, CRC-32C per dataset, atomic commit, no pickle.

Layout of ``RUN_DIR/checkpoints/step-00000440.h5`` (readable with h5py or ``h5dump`` alone)::

    /model/<param or buffer name>          tensors (bfloat16 stored as int16 bits; see attr torch_dtypes)
    /optimizer/state/<param index>/<key>   optimizer tensors (momentum buffers, Adam moments, ...)
    /rng/rank_<r>                          each rank's packed RNG states (torch, python, numpy), uint8
    /train/window_losses                   per-(rank, step) losses of the unfinished logging window
    attrs: format, version, step, epoch, step_in_epoch, world_size, spec (JSON), spec_sha256,
           optimizer_param_groups, optimizer_scalars, scheduler, torch_dtypes (JSON), versions, created,
           meta_crc32c (last: the CRC-32C of all the rest but the tensors' bytes)

Every dataset carries an attribute ``crc32c`` of its bytes (CRC-32C, :mod:`hpcai.crc`; checkpoints of
hpcai 0.x before it carry zlib's ``crc32``, still checked), and the root attribute ``meta_crc32c`` (format
version 2) covers everything else a resume depends on: every attribute (name, stored type, bytes) and the
list of groups and datasets with their shapes, dtypes and attributes, so an edited scheduler state or step, a
renamed or removed dataset or a flipped stored dimension is caught like a flipped tensor byte. A corrupted or
truncated file is reported and skipped in favour of the previous checkpoint. CRC-32C (16 GB/s here, GIL
released) rather than SHA-256 (~1.8 GB/s): it catches the bit flips and truncation storage produces at a
fraction of the cost (it is not a defence against deliberate tampering). Files of format version 1 still
load, without the attribute check (``hpcai inspect`` says so).

A file that passes its checksums can still be unloadable (an older format, or damage the checksums do not
cover): declared sizes are checked against what the file physically holds before anything is read, and the
JSON attributes are parsed and checked on read, so such a file is one :class:`CheckpointError` line, never a
MemoryError or a traceback; :func:`check_fits_model` checks names, shapes and dtypes against the model before
anything is loaded.

A checkpoint is written to a temporary name unique to the writer (``.step-*.h5.tmp-HOST-PID-TOKEN``,
:func:`hpcai.fsio.temp_name`), created ``O_EXCL | O_NOFOLLOW`` so that no planted file or symlink can redirect
it, with its disk space allocated before HDF5 writes a byte (HDF5 can crash after a failed write: a full disk
fails cleanly, :class:`hpcai.fsio.NoSpaceError`), and renamed only when complete; older ones beyond ``keep``
are deleted only after a newer one is committed. :func:`remove_stale_temporaries` removes what killed writers
left. Inspect one with::

    hpcai inspect runs/digits/checkpoints/step-00000440.h5
    hpcai inspect runs/digits              # which checkpoint a resume would take
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import random
import threading
import time
import zlib
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from hpcai import fsio
from hpcai.crc import crc32c
from hpcai.errors import UserError

FORMAT = "hpcai-checkpoint"
VERSION = 2  # 2: the attribute META_CRC covers the attributes and the list of arrays (1: tensors only)
META_CRC = "meta_crc32c"


class CheckpointError(UserError):
    """A checkpoint that cannot be used: corrupt, truncated, of another job, or missing pieces."""


@dataclass
class Payload:
    """Everything a checkpoint holds: named arrays and JSON-able attributes."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    attrs_checked: bool = False  # read from a file whose attributes a checksum covers (format version >= 2)

    @property
    def step(self) -> int:
        return int(self.attrs["step"])


# ------------------------------------------------------------------------------------ tensors <-> arrays


def tensor_to_array(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """A numpy view of a CPU tensor's memory and its torch dtype name (numpy has no bfloat16: keep its bits).

    No copy: a synchronous save writes straight from the live tensors; an asynchronous one snapshots them into
    its reused buffers first.
    """
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy(), "bfloat16"
    return t.numpy(), str(t.dtype).removeprefix("torch.")


def array_to_tensor(a: np.ndarray, torch_dtype: str) -> torch.Tensor:
    t = torch.from_numpy(
        a if a.flags.c_contiguous else a.copy()
    )  # not ascontiguousarray: it makes 0-dim 1-dim
    return t.view(torch.bfloat16) if torch_dtype == "bfloat16" else t


def pack_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> Payload:
    """Model, optimizer and scheduler state as arrays + JSON attributes (no Python objects survive)."""
    p = Payload()
    dtypes: dict[str, str] = {}
    for name, t in model.state_dict().items():
        p.arrays[f"model/{name}"], dtypes[f"model/{name}"] = tensor_to_array(t)
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in opt["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                name = f"optimizer/state/{idx}/{key}"
                p.arrays[name], dtypes[name] = tensor_to_array(value)
            else:
                scalars.setdefault(str(idx), {})[key] = value
    p.attrs["optimizer_param_groups"] = json.dumps(opt["param_groups"])
    p.attrs["optimizer_scalars"] = json.dumps(scalars)
    p.attrs["scheduler"] = json.dumps(scheduler.state_dict())
    p.attrs["torch_dtypes"] = json.dumps(dtypes)
    return p


def step_owned_keys(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> set[str]:
    """The arrays of ``pack_state`` that only the optimizer step changes (parameters, optimizer state): an
    asynchronous save may copy them after it returns, until ``CheckpointWriter.fence()``. Buffers are not
    among them: a forward pass may update them."""
    params = {f"model/{name}" for name, _ in model.named_parameters()}
    return {k for k in arrays if k in params or k.startswith("optimizer/state/")}


def _payload_json(p: Payload, key: str, kind: type) -> Any:
    if key not in p.attrs:
        raise CheckpointError(f"checkpoint attribute {key!r} missing")
    return _parse_json_attr(f"checkpoint attribute {key!r}", p.attrs[key], kind)


def _numpy_dtype(torch_dtype: str) -> np.dtype | None:
    """How a tensor of ``torch_dtype`` is stored (bfloat16 as its int16 bits); None for types numpy lacks."""
    if torch_dtype == "bfloat16":
        return np.dtype(np.int16)
    try:
        return np.dtype(torch_dtype)
    except TypeError:
        return None


def _check_stored_dtype(key: str, a: np.ndarray, dtypes: dict[str, str]) -> None:
    if key not in dtypes:
        raise CheckpointError(f"checkpoint tensor {key} has no entry in attribute 'torch_dtypes'")
    want = _numpy_dtype(dtypes[key])
    if want is not None and a.dtype != want:
        raise CheckpointError(
            f"checkpoint tensor {key} is stored as {a.dtype}, its record says {dtypes[key]}"
        )


_SCALAR_STATE = {"step"}  # optimizer state entries that are one number per parameter


def check_fits_model(
    p: Payload, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None
) -> None:
    """Raise :class:`CheckpointError` naming the first tensor (or attribute) of ``p`` that ``model`` (and
    ``optimizer``, ``scheduler``) would not take: missing, extra, of another shape, stored as another dtype
    than its record says. Nothing is loaded: the unpack functions call it first, so a misfit leaves the model
    and the optimizer as they were."""
    dtypes = _payload_json(p, "torch_dtypes", dict)
    expected = model.state_dict()
    for name, t in expected.items():
        key = f"model/{name}"
        if key not in p.arrays:
            raise CheckpointError(f"checkpoint lacks tensor {key} that the model has")
        if tuple(p.arrays[key].shape) != tuple(t.shape):
            raise CheckpointError(
                f"checkpoint tensor {key} has shape {tuple(p.arrays[key].shape)}, "
                f"the model's is {tuple(t.shape)}"
            )
        _check_stored_dtype(key, p.arrays[key], dtypes)
    extra = sorted(k for k in p.arrays if k.startswith("model/") and k[6:] not in expected)
    if extra:
        raise CheckpointError(f"checkpoint has tensors the model lacks: {', '.join(extra[:5])}")
    if optimizer is not None:
        params = [q for g in optimizer.param_groups for q in g["params"]]
        for key, a in p.arrays.items():
            if not key.startswith("optimizer/state/"):
                continue
            parts = key.split("/", 3)
            if len(parts) != 4 or not parts[2].isdigit() or int(parts[2]) >= len(params):
                raise CheckpointError(
                    f"checkpoint tensor {key}: the optimizer has no parameter of that index "
                    f"(it has {len(params)})"
                )
            shape = tuple(params[int(parts[2])].shape)
            # Adam's step is one number a parameter (0-dim; 1-dim from a pipeline's gather); the rest is
            # shaped like its parameter.
            if tuple(a.shape) != shape and not (parts[3] in _SCALAR_STATE and a.size == 1):
                raise CheckpointError(
                    f"checkpoint tensor {key} has shape {tuple(a.shape)}, its parameter's is {shape}"
                )
            _check_stored_dtype(key, a, dtypes)
        groups = _payload_json(p, "optimizer_param_groups", list)
        own_groups = optimizer.state_dict()["param_groups"]
        sizes = [len(g.get("params", ())) if isinstance(g, dict) else -1 for g in groups]
        if sizes != [len(g["params"]) for g in own_groups]:
            raise CheckpointError(
                f"checkpoint attribute 'optimizer_param_groups': groups of {sizes} parameters, "
                f"the optimizer's have {[len(g['params']) for g in own_groups]}"
            )
        for i, (saved, own) in enumerate(zip(groups, own_groups, strict=True)):
            _check_like("optimizer_param_groups", f"[{i}]", saved, own)
        for idx, values in _payload_json(p, "optimizer_scalars", dict).items():
            if not str(idx).isdigit() or int(idx) >= len(params) or not isinstance(values, dict):
                raise CheckpointError(f"checkpoint attribute 'optimizer_scalars': bad entry {idx!r}")
    if scheduler is not None:
        _check_like("scheduler", "", _payload_json(p, "scheduler", dict), scheduler.state_dict())


def _check_like(attr: str, where: str, saved: Any, own: Any) -> None:
    """``saved`` (a JSON attribute) has the structure of ``own`` (the live object's state): the same kinds
    of values, list lengths included, at every key both have (torch versions add and drop keys)."""
    if isinstance(own, dict) and isinstance(saved, dict):
        for key in own.keys() & saved.keys():
            _check_like(attr, f"{where}.{key}" if where else key, saved[key], own[key])
        return
    if isinstance(own, (list, tuple)) and isinstance(saved, list) and len(own) == len(saved):
        for i, (a, b) in enumerate(zip(saved, own, strict=True)):
            _check_like(attr, f"{where}[{i}]", a, b)
        return
    if _json_kind(saved) != _json_kind(own) and own is not None:
        raise CheckpointError(
            f"checkpoint attribute {attr!r}: {where or 'value'} is {_json_kind(saved)}, "
            f"expected {_json_kind(own)}"
        )


def _json_kind(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return type(v).__name__
    if isinstance(v, (int, float)):  # numbers are alike: a learning rate may be stored as 1 or 1.0
        return "a number"
    if isinstance(v, (list, tuple)):
        return f"a list of {len(v)}"
    return {"str": "a string", "dict": "an object"}.get(type(v).__name__, type(v).__name__)


def unpack_model(p: Payload, model: torch.nn.Module) -> None:
    """Load the model's tensors only (inference needs no optimizer); a missing or misfit tensor is named."""
    check_fits_model(p, model)
    dtypes = json.loads(p.attrs["torch_dtypes"])
    model.load_state_dict(
        {
            name: array_to_tensor(p.arrays[f"model/{name}"], dtypes[f"model/{name}"])
            for name in model.state_dict()
        }
    )


def unpack_state(
    p: Payload, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> None:
    """Load what :func:`pack_state` stored; a missing tensor or a wrong shape names the tensor, and nothing
    is changed then."""
    check_fits_model(p, model, optimizer, scheduler)
    dtypes = json.loads(p.attrs["torch_dtypes"])
    opt_state: dict[int, dict[str, Any]] = {}
    for key, a in p.arrays.items():
        if key.startswith("optimizer/state/"):
            _, _, idx, name = key.split("/", 3)
            opt_state.setdefault(int(idx), {})[name] = array_to_tensor(a, dtypes[key])
    for idx, values in json.loads(p.attrs["optimizer_scalars"]).items():
        opt_state.setdefault(int(idx), {}).update(values)
    unpack_model(p, model)
    optimizer.load_state_dict(
        {"state": opt_state, "param_groups": json.loads(p.attrs["optimizer_param_groups"])}
    )
    scheduler.load_state_dict(json.loads(p.attrs["scheduler"]))


# ------------------------------------------------------------------------------------ RNG states


_TORCH_RNG_BYTES = torch.get_rng_state().numel()


def pack_rng() -> np.ndarray:
    """This process's torch, python and numpy RNG states (and its GPU's, when CUDA is in use) as one uint8
    array of a fixed length per device type."""
    version, py_state, _ = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    parts = [
        torch.get_rng_state().numpy(),
        np.asarray(py_state, dtype=np.uint32).view(np.uint8),
        np.asarray(np_keys, dtype=np.uint32).view(np.uint8),
        np.array([np_pos, np_has_gauss, version], dtype=np.int64).view(np.uint8),
        np.array([np_cached], dtype=np.float64).view(np.uint8),
    ]
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # train.device = "cuda": this rank's GPU
        parts.append(torch.cuda.get_rng_state().numpy())
    return np.concatenate(parts)


_RNG_BYTES = _TORCH_RNG_BYTES + 625 * 4 + 624 * 4 + 32  # what pack_rng packs before an optional GPU state


def unpack_rng(blob: np.ndarray) -> None:
    """Restore what :func:`pack_rng` packed; a blob of another size or type is a CheckpointError."""
    if blob.dtype != np.uint8 or blob.ndim != 1 or len(blob) < _RNG_BYTES:
        raise CheckpointError(
            f"checkpoint RNG state: {blob.dtype} {tuple(blob.shape)}, expected uint8 of >= {_RNG_BYTES} bytes"
        )
    blob = np.ascontiguousarray(blob)
    o = _TORCH_RNG_BYTES
    torch.set_rng_state(torch.from_numpy(blob[:o].copy()))
    py_state = blob[o : o + 625 * 4].view(np.uint32)
    o += 625 * 4
    np_keys = blob[o : o + 624 * 4].view(np.uint32)
    o += 624 * 4
    np_pos, np_has_gauss, version = blob[o : o + 24].view(np.int64)
    np_cached = blob[o + 24 : o + 32].view(np.float64)[0]
    cuda_state = blob[o + 32 :]  # present when the run trained on a GPU; ignored on a CPU-only resume
    if len(cuda_state) and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.from_numpy(cuda_state.copy()))
    random.setstate((int(version), tuple(int(v) for v in py_state), None))
    np.random.set_state(("MT19937", np_keys.copy(), int(np_pos), int(np_has_gauss), float(np_cached)))


# ------------------------------------------------------------------------------------ files


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step-{step:08d}.h5"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Committed checkpoints, oldest first (temporary files of unfinished writes are not listed)."""
    d = checkpoint_dir(run_dir)
    return sorted(d.glob("step-*.h5")) if d.is_dir() else []


def _checksum_ok(ds: h5py.Dataset, a: np.ndarray) -> bool:
    if "crc32c" in ds.attrs:
        return int(ds.attrs["crc32c"]) == crc32c(a)
    if "crc32" in ds.attrs:  # written before CRC-32C
        return int(ds.attrs["crc32"]) == zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1).data)
    return False


ALIGN = 4096  # O_DIRECT's alignment of file offsets, lengths and memory (the page size covers every disk)
DIRECT_MIN_BYTES = 1 << 20  # arrays from this size up are written with O_DIRECT when their memory is aligned


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array whose data starts on an ALIGN boundary (O_DIRECT needs aligned memory)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


STAGE_BYTES = 64 << 20  # aligned staging buffer for O_DIRECT writes of arrays in unaligned memory


def _direct_ok(a: np.ndarray) -> bool:
    return a.nbytes >= DIRECT_MIN_BYTES and a.flags.c_contiguous


def write_checkpoint(path: Path, payload: Payload) -> int:
    """Write ``payload`` to ``path`` atomically (temporary name, fsync, rename); return the bytes written.

    The temporary file (a name unique to this writer) is created ``O_EXCL | O_NOFOLLOW`` and its space
    allocated before HDF5 touches it: a full disk fails there, cleanly, as :class:`hpcai.fsio.NoSpaceError`
    naming ``path`` (HDF5 can crash at exit once one of its writes has failed), and HDF5 then opens that very
    file (checked by inode), so no planted symlink or file redirects the write.

    Large arrays bypass the page cache: HDF5 lays out the file (contiguous datasets, allocated at creation,
    4 KiB-aligned) and writes the metadata, then the bytes go to their offsets with ``O_DIRECT``, straight
    from aligned memory (the asynchronous writer's snapshot buffers) or through a 64 MiB aligned staging
    buffer (live tensors of a synchronous save). Copying 400 MB into the page cache costs memory bandwidth
    and a core that training needs (measured: a buffered write of 400 MB slowed the concurrent training steps
    by 0.15-0.29 s, O_DIRECT by 0.04-0.06 s), and a buffered 403 MB file took 0.6-1.3 s to write and fsync
    where O_DIRECT took 0.14-0.17 s. Where O_DIRECT is refused (tmpfs, some network file systems), plain
    writes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = fsio.temp_name(path)
    try:
        fd = fsio.create_exclusive(tmp)  # an existing name (a planted symlink) raises: nothing is followed
    except OSError as e:
        if fsio.is_no_space(e):
            raise fsio.no_space(path, e) from None
        raise
    try:
        _reserve(fd, path.parent, _estimated_bytes(payload))
        _pwrite_all(fd, memoryview(_empty_hdf5()), 0)
        direct: dict[str, int] = {}  # dataset -> file offset, for the arrays written after HDF5 closes
        crcs: dict[str, int] = {}
        early = h5py.h5p.create(h5py.h5p.DATASET_CREATE)  # space allocated at creation, never filled
        early.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        early.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        # No HDF5 file locks: one writer (rank 0) to a private temporary name, so locks add nothing, and they
        # fail on some network file systems (what HDF5_USE_FILE_LOCKING=FALSE works around for other files).
        with h5py.File(
            tmp, "r+", locking=False, alignment_threshold=DIRECT_MIN_BYTES, alignment_interval=ALIGN
        ) as f:
            _same_file(fd, f.id.get_vfd_handle(), tmp)
            for key, a in payload.arrays.items():
                if _direct_ok(a):
                    ds = f.create_dataset(key, a.shape, a.dtype, dcpl=early)
                    direct[key] = ds.id.get_offset()
                else:
                    ds = f.create_dataset(key, data=a)
                crcs[key] = crc32c(a)
                ds.attrs["crc32c"] = np.uint32(crcs[key])
            for key, value in payload.attrs.items():
                if key != META_CRC:
                    f.attrs[key] = value
            f.attrs["format"] = FORMAT
            f.attrs["version"] = VERSION
            f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            # Last; the attributes as the file now holds them (stored types), exactly what a reader checks.
            listing = _written_listing(payload.arrays, crcs)
            f.attrs[META_CRC] = np.uint32(_meta_crc(dict(f.attrs.items()), listing))
        _write_at(fd, tmp, [(payload.arrays[k], off) for k, off in direct.items()])
        os.fsync(fd)  # the data must be on disk before the name says it is complete
        _same_file(fd, -1, tmp)  # the name still leads to our file: the rename commits what we wrote
        size = os.fstat(fd).st_size
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if fsio.is_no_space(e):
            raise fsio.no_space(path, e) from None
        raise
    finally:
        os.close(fd)
    fsio.fsync_dir(path.parent)
    return size


def _same_file(fd: int, other: int, name: Path) -> None:
    """Raise unless descriptor ``other`` (or, for -1, what ``name`` now is) is the file of ``fd``."""
    a = os.fstat(fd)
    try:
        b = os.fstat(other) if other >= 0 else os.lstat(name)
    except OSError:
        b = None
    if b is None or (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
        raise CheckpointError(f"{name}: replaced while being written (by another process?): not committed")


@functools.cache
def _empty_hdf5() -> bytes:
    """An empty HDF5 file: written into the exclusively created temporary so that HDF5 opens it ("r+") rather
    than creating (and truncating) a file by name."""
    with h5py.File(f"hpcai-empty-{os.getpid()}", "w", driver="core", backing_store=False) as f:
        f.flush()
        return bytes(f.id.get_file_image())


def _estimated_bytes(p: Payload) -> int:
    """An upper bound of the file's size: the arrays, their alignment padding, and HDF5's metadata (object
    headers ~0.4 KiB a dataset, a B-tree and heap ~1 KiB a group, the attributes), counted generously and
    with half again to spare (measured: 2.4x to 5.8x what files of 0 to 3,000 datasets used). HDF5 truncates
    the file to what it used when it closes."""
    data = sum(a.nbytes + (ALIGN if _direct_ok(a) else 0) for a in p.arrays.values())
    groups = {k.rsplit("/", i)[0] for k in p.arrays for i in range(1, k.count("/") + 1)}
    meta = (
        8192
        + sum(640 + 2 * len(k) for k in p.arrays)
        + 1536 * len(groups)
        + sum(256 + 2 * len(str(v)) for v in p.attrs.values())
    )
    return data + meta * 3 // 2 + (16 << 10)


@functools.cache
def _libc_fallocate():
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):  # not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    return fn


def _reserve(fd: int, directory: Path, nbytes: int) -> None:
    """Allocate ``nbytes`` of disk for the file now (fallocate(2), not glibc's emulation, which writes a byte
    per block); where the file system cannot, compare with its free space instead."""
    import ctypes

    fn = _libc_fallocate()
    if fn is not None:
        if fn(fd, 0, 0, nbytes) == 0:
            return
        err = ctypes.get_errno()
        if err in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(err, os.strerror(err))
    st = os.statvfs(directory)
    if st.f_bavail * st.f_frsize < nbytes:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _write_at(fd: int, name: Path, parts: list[tuple[np.ndarray, int]]) -> None:
    """Each array's bytes at its file offset through ``fd``; the aligned bulk with O_DIRECT (a second
    descriptor, opened ``O_NOFOLLOW`` and checked to be the same file), the tail (and everything, if O_DIRECT
    is refused) through the page cache."""
    if not parts:
        return
    dfd = -1
    if hasattr(os, "O_DIRECT"):
        try:
            dfd = os.open(name, os.O_WRONLY | os.O_DIRECT | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            dfd = -1  # refused (or the name is a symlink now: _same_file before the rename says so)
    stage: np.ndarray | None = None
    try:
        if dfd >= 0:
            _same_file(fd, dfd, name)
        for a, offset in parts:
            flat = a.reshape(-1).view(np.uint8)
            view = memoryview(flat)
            bulk = len(view) // ALIGN * ALIGN if dfd >= 0 and offset % ALIGN == 0 else 0
            if bulk:
                try:
                    if a.ctypes.data % ALIGN == 0:
                        _pwrite_all(dfd, view[:bulk], offset)
                    else:  # O_DIRECT needs aligned memory: through the staging buffer, 64 MiB at a time
                        if stage is None:
                            stage = aligned_empty((STAGE_BYTES,), np.uint8)
                        for start in range(0, bulk, STAGE_BYTES):
                            n = min(STAGE_BYTES, bulk - start)
                            np.copyto(stage[:n], flat[start : start + n])
                            _pwrite_all(dfd, memoryview(stage[:n]), offset + start)
                except OSError as e:  # refused after all (EINVAL on some file systems): the page cache
                    if fsio.is_no_space(e):
                        raise
                    bulk = 0
            _pwrite_all(fd, view[bulk:], offset + bulk)
    finally:
        if dfd >= 0:
            os.close(dfd)


def _pwrite_all(fd: int, view: memoryview, offset: int, block: int = 64 << 20) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done : done + block], offset + done)


# ------------------------------------------------------------------------------------ reading, checking


def _canonical(value: Any) -> Any:
    """An attribute value as JSON that holds its stored type and every bit (a flipped bit changes it)."""
    if isinstance(value, str):
        return ["str", value]
    a = np.asarray(value)
    if a.dtype.kind == "O":
        return ["obj", list(a.shape), [_canonical(v) for v in a.reshape(-1).tolist()]]
    return [a.dtype.str, list(a.shape), a.tobytes().hex()]


def _meta_crc(attrs: dict[str, Any], listing: list[list[Any]]) -> int:
    """CRC-32C of the attributes (all but META_CRC) and of the listing of every group and dataset."""
    doc = [sorted([k, _canonical(v)] for k, v in attrs.items() if k != META_CRC), listing]
    return crc32c(np.frombuffer(json.dumps(doc, separators=(",", ":")).encode(), np.uint8))


def _listing(objects: list[tuple[str, Any]]) -> list[list[Any]]:
    """Each group and dataset, by name, as [name, attributes] (+ [shape, dtype] for a dataset)."""
    out = []
    for name, obj in objects:
        entry = [name, sorted([k, _canonical(v)] for k, v in obj.attrs.items())]
        if isinstance(obj, h5py.Dataset):
            entry += [list(obj.shape), obj.dtype.str]
        out.append(entry)
    return out


def _written_listing(arrays: dict[str, np.ndarray], crcs: dict[str, int]) -> list[list[Any]]:
    """What :func:`_listing` reads back from the file that write_checkpoint wrote, computed without reading
    it back (250 datasets' attributes took 0.1 s to read, the GIL held: the training thread's time)."""
    groups = {k.rsplit("/", i)[0] for k in arrays for i in range(1, k.count("/") + 1)}
    out: list[list[Any]] = [[g, []] for g in groups]
    for k, a in arrays.items():
        out.append([k, [["crc32c", _canonical(np.uint32(crcs[k]))]], list(a.shape), a.dtype.str])
    return sorted(out, key=lambda e: e[0])


def _objects(f: h5py.File, path: Path) -> list[tuple[str, Any]]:
    """Every group and dataset, sorted by name; one that HDF5 cannot open (a stored dimension beyond its
    maximum, ...) is a CheckpointError naming it."""
    names: list[str] = []
    f.visit(names.append)
    out = []
    for name in sorted(names):
        try:
            out.append((name, f[name]))
        except (KeyError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: /{name}: unreadable ({_one_line(e)})") from None
    return out


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _check_sizes(path: Path, datasets: list[tuple[str, h5py.Dataset]], file_bytes: int) -> None:
    """Before anything is read: every dataset holds numbers and is backed by as many bytes as its shape
    declares, and all of them fit in the file (a flipped dimension must not allocate terabytes)."""
    total = 0
    for name, ds in datasets:
        if ds.dtype.kind not in "biufc":
            raise CheckpointError(f"{path}: dataset /{name} holds {ds.dtype}, not numbers (corrupt file)")
        declared = math.prod(ds.shape) * ds.dtype.itemsize
        stored = ds.id.get_storage_size()
        if declared > stored:
            raise CheckpointError(
                f"{path}: dataset /{name} declares {declared} bytes, the file holds {stored} for it "
                "(corrupt file)"
            )
        total += declared
    if total > file_bytes:
        raise CheckpointError(
            f"{path}: datasets declare {total} bytes, more than the file's {file_bytes} (corrupt file)"
        )


def _read_attrs(f: h5py.File, path: Path) -> dict[str, Any]:
    out = {}
    for key in f.attrs:
        try:
            out[key] = f.attrs[key]
        except (OSError, ValueError, TypeError, KeyError) as e:  # e.g. a string that is no longer UTF-8
            raise CheckpointError(f"{path}: attribute {key!r}: unreadable ({_one_line(e)})") from None
    return out


def _parse_json_attr(where: str, value: Any, kind: type) -> Any:
    if not isinstance(value, str):
        raise CheckpointError(f"{where}: expected a JSON string, found {type(value).__name__}")
    try:
        out = json.loads(value)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{where}: not valid JSON ({_one_line(e)})") from None
    if not isinstance(out, kind):
        raise CheckpointError(f"{where}: expected a JSON {'object' if kind is dict else 'array'}")
    return out


_REQUIRED_INTS = {"step": 0, "epoch": 0, "step_in_epoch": 0, "world_size": 1}  # name -> smallest value
_OPTIONAL_INTS = {
    "samples_seen": 0,
    "shuffle_seed": None,
    "ps_version": 0,
    "ps_workers": 1,
    "skipped_steps": 0,
}
_JSON_ATTRS = {
    "spec": dict,
    "torch_dtypes": dict,
    "optimizer_param_groups": list,
    "optimizer_scalars": dict,
    "scheduler": dict,
    "versions": dict,
    "pipeline_bounds": list,
    "ps_scalars": dict,
}


def _check_attrs(path: Path, attrs: dict[str, Any], arrays: Collection[str]) -> None:
    """What a resume reads from the attributes is there and of the right kind: one line naming the
    attribute otherwise (not a JSONDecodeError or KeyError later, on some rank)."""
    for key, low in (_REQUIRED_INTS | _OPTIONAL_INTS).items():
        if key not in attrs:
            if key in _REQUIRED_INTS:
                raise CheckpointError(f"{path}: attribute {key!r} missing")
            continue
        v = attrs[key]
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or (low is not None and v < low):
            raise CheckpointError(
                f"{path}: attribute {key!r}: must be an integer{f' >= {low}' if low is not None else ''}, "
                f"found {v!r}"
            )
    if "last_loss" in attrs and not isinstance(attrs["last_loss"], (int, float, np.integer, np.floating)):
        raise CheckpointError(
            f"{path}: attribute 'last_loss': must be a number, found {attrs['last_loss']!r}"
        )
    for key in ("spec", "torch_dtypes"):
        if key not in attrs:
            raise CheckpointError(f"{path}: attribute {key!r} missing")
    parsed = {
        k: _parse_json_attr(f"{path}: attribute {k!r}", attrs[k], kind)
        for k, kind in _JSON_ATTRS.items()
        if k in attrs
    }
    if not all(isinstance(v, dict) for v in parsed["spec"].values()):
        raise CheckpointError(f"{path}: attribute 'spec': expected an object of sections")
    for name, dtype in parsed["torch_dtypes"].items():
        if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise CheckpointError(
                f"{path}: attribute 'torch_dtypes': {dtype!r} (of {name}) is no torch dtype"
            )
    if "rng/rank_0" in arrays:  # every rank of the writer's world saved its RNG states
        missing = [f"rng/rank_{r}" for r in range(int(attrs["world_size"])) if f"rng/rank_{r}" not in arrays]
        if missing:
            raise CheckpointError(f"{path}: dataset /{missing[0]} missing (world_size {attrs['world_size']})")


def read_checkpoint(path: Path, verify: bool = True) -> Payload:
    """Read a checkpoint; with ``verify``, check every dataset's checksum. Never executes stored code.

    Always (it costs no reading of tensors) checks the attributes' checksum, the declared sizes against the
    file's, and the attributes a resume reads: a file that fails is one :class:`CheckpointError` line.
    """
    path = Path(path)
    if not path.is_file():  # not a directory, and never a FIFO or a device that would block or never end
        raise CheckpointError(f"{path}: no such checkpoint file")
    p = Payload()
    try:
        with h5py.File(path, "r", locking=False) as f:  # committed files never change: nothing to lock
            attrs = _read_attrs(f, path)
            if attrs.get("format") != FORMAT:
                raise CheckpointError(f"{path}: not an hpcai checkpoint (format attribute missing)")
            version = attrs.get("version")
            if not isinstance(version, (int, np.integer)) or not 1 <= version <= VERSION:
                raise CheckpointError(
                    f"{path}: format version {version!r}: this hpcai reads versions 1 to {VERSION}"
                )
            objects = _objects(f, path)
            if META_CRC in attrs:  # checked in a version 1 file too: a flipped version must not skip it
                if int(np.asarray(attrs[META_CRC]).reshape(-1)[0]) != _meta_crc(attrs, _listing(objects)):
                    raise CheckpointError(
                        f"{path}: attributes or list of arrays fail their CRC-32C check (corrupt file)"
                    )
                p.attrs_checked = True
            elif version >= 2:
                raise CheckpointError(f"{path}: attribute {META_CRC!r} missing (corrupt file)")
            datasets = [(n, o) for n, o in objects if isinstance(o, h5py.Dataset)]
            _check_sizes(path, datasets, os.fstat(f.id.get_vfd_handle()).st_size)
            for name, ds in datasets:
                a = np.asarray(ds[()])
                if verify and not _checksum_ok(ds, a):
                    raise CheckpointError(f"{path}: dataset /{name} fails its CRC-32C check (corrupt file)")
                p.arrays[name] = a
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:  # truncated or garbled HDF5
        raise CheckpointError(f"{path}: unreadable checkpoint: {_one_line(e)}") from None
    _check_attrs(path, attrs, p.arrays)
    p.attrs = {k: v.item() if isinstance(v, np.generic) else v for k, v in attrs.items()}
    return p


def find_resumable(run_dir: Path, warn=print) -> tuple[Path, Payload] | None:
    """The newest checkpoint that reads and verifies; broken newer ones are reported and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, read_checkpoint(path)
        except CheckpointError as e:
            warn(f"warning: skipping checkpoint: {e}")
    return None


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary checkpoint files that killed writers left in ``RUN_DIR/checkpoints`` (and the
    ``.step-*.h5.tmp`` of hpcai before unique temporary names); symlinks are removed, never followed.

    Call it only while holding the run directory's lock: a live writer's temporary file would be pulled from
    under it. Returns what was removed.
    """
    d = checkpoint_dir(run_dir)
    removed = fsio.remove_stale_temporaries(d)
    for entry in sorted(d.glob(".step-*.h5.tmp")) if d.is_dir() else []:
        if entry.is_symlink() or not entry.is_dir():
            try:
                entry.unlink()
                removed.append(entry)
            except OSError:
                pass
    return removed


def spec_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``section.key: old -> new`` for every key that differs (ignoring what may change on a restart)."""
    from hpcai.spec import JobSpec

    # A key the saved spec lacks was added to hpcai since: it had its default then.
    defaults = JobSpec().to_dict()
    out = []
    for section in sorted(set(saved) | set(current)):
        a, b = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(a) | set(b)):
            if (section, key) in RESTART_MAY_CHANGE or section == "slurm":
                continue
            old = a[key] if key in a else defaults.get(section, {}).get(key)
            if old != b.get(key):
                out.append(f"{section}.{key}: {old!r} -> {b.get(key)!r}")
    return out


# Keys a restart may change without making it another job: where it runs, on how many ranks, how often it
# checkpoints, how it prefetches, how a pipeline is laid out. A pipeline checkpoint holds the whole model
# named as unsplit, so it resumes onto other cuts, stage counts, replica counts and schedules; micro_batches
# stays: it changes what a normalisation layer sees.
RESTART_MAY_CHANGE = {
    ("parallel", "stages"),
    ("parallel", "split"),
    ("parallel", "schedule"),
    ("parallel", "data_replicas"),
    ("parallel", "recompute"),
    ("parallel", "offload"),
    ("job", "ranks"),
    ("job", "run_dir"),
    ("data", "prefetch"),
    ("checkpoint", "every_steps"),
    ("checkpoint", "every_seconds"),
    ("checkpoint", "keep"),
    ("checkpoint", "async_save"),
    ("comm", "bucket_mb"),
    ("comm", "first_bucket_mb"),
    ("comm", "overlap"),
    ("comm", "stall_timeout_s"),
    ("comm", "stall_abort"),
}


# ------------------------------------------------------------------------------------ writer


WRITER_NICE = 10  # the asynchronous writer's nice value once its snapshot is taken


def _lower_thread_priority() -> None:
    try:  # on Linux PRIO_PROCESS with a thread id renices that thread alone
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
    except (OSError, AttributeError):
        pass


class CheckpointWriter:
    """Commits checkpoints of one run, synchronously or in a background thread, and prunes old ones.

    Asynchronous mode (CheckFreq's snapshot-then-persist): the arrays are copied into host buffers that are
    allocated once and reused, and a thread writes the file while training goes on. At most one write is in
    flight; the next ``save`` first waits for it.

    Arrays named in ``save(..., deferred=...)`` (parameters and optimizer state: only the optimizer step
    changes them) are copied by the thread too, while the next step's forward and backward run, as CheckFreq
    pipelines its snapshot; ``fence()`` before the optimizer step waits for that copy. The rest (buffers a
    forward pass updates, RNG states) is copied before ``save`` returns. A checkpoint's blocking time is
    ``save``'s plus the fence's wait.
    """

    def __init__(self, run_dir: Path, keep: int, async_save: bool, log=print):
        self.run_dir, self.keep, self.async_save, self.log = Path(run_dir), keep, async_save, log
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._buffers: dict[str, np.ndarray] = {}
        self._snapped: threading.Event | None = None  # set when the deferred arrays are copied
        self.last_block_s = 0.0
        self.last_write_s = 0.0
        self.thread_cpu_s: dict[str, float] = {}  # file -> CPU seconds its asynchronous commit took
        self.bytes_written = 0

    def save(self, payload: Payload, deferred: Collection[str] = ()) -> Path:
        """Commit ``payload`` (asynchronously: start committing it); ``deferred`` names arrays that stay
        unchanged until the caller's ``fence()`` (asynchronous mode only; the synchronous one ignores it)."""
        t0 = time.perf_counter()
        self.wait()
        path = checkpoint_path(self.run_dir, payload.step)
        if not self.async_save:
            self._persist(path, payload)
        else:
            now = {k: self._snapshot(k, a) for k, a in payload.arrays.items() if k not in deferred}
            later = {k: a for k, a in payload.arrays.items() if k in deferred}
            snapped = self._snapped = threading.Event()
            self._thread = threading.Thread(
                target=self._guarded,
                args=(lambda: self._snapshot_and_persist(path, payload, now, later, snapped),),
                daemon=False,
            )
            self._thread.start()
        self.last_block_s = time.perf_counter() - t0
        return path

    def fence(self) -> float:
        """Wait until the deferred arrays of the last ``save`` are copied (call it before they change);
        return the seconds waited: the caller adds them to that checkpoint's blocking time."""
        if self._snapped is None:
            return 0.0
        t0 = time.perf_counter()
        self._snapped.wait()
        self._snapped = None
        return time.perf_counter() - t0

    def _snapshot_and_persist(
        self,
        path: Path,
        payload: Payload,
        now: dict[str, np.ndarray],
        later: dict[str, np.ndarray],
        snapped: threading.Event,
    ) -> None:
        cpu0 = time.thread_time()
        try:  # numpy's copy releases the GIL: the training thread runs on meanwhile
            now.update({k: self._snapshot(k, a) for k, a in later.items()})
        finally:
            snapped.set()  # also on an error (raised by the next wait()): a fence must never hang
        # The copy was urgent (a fence may wait for it); checksums and writes are not: yield the cores to
        # training and use what it leaves idle (Linux: a thread's own nice value).
        _lower_thread_priority()
        arrays = {k: now[k] for k in payload.arrays}  # the payload's order, so files are laid out alike
        self._persist(path, Payload(arrays=arrays, attrs=payload.attrs))
        self.thread_cpu_s[path.name] = time.thread_time() - cpu0

    def reserve(self, arrays: dict[str, np.ndarray]) -> None:
        """Asynchronous mode: allocate (and fault in) the snapshot buffers for arrays like these on a thread
        now, so that the first checkpoint does not pay it inside the training loop (400 MB took 0.84 s of
        page faults here). The next ``save`` waits for it like for a write in flight."""
        if not self.async_save or self._buffers or self._thread is not None:
            return

        def allocate() -> None:
            for key, a in arrays.items():
                buf = aligned_empty(a.shape, a.dtype)
                buf.reshape(-1).view(np.uint8)[:] = 0  # touch every page now
                self._buffers[key] = buf

        self._thread = threading.Thread(target=self._guarded, args=(allocate,), daemon=True)
        self._thread.start()

    def _snapshot(self, key: str, a: np.ndarray) -> np.ndarray:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != a.shape or buf.dtype != a.dtype:
            buf = self._buffers[key] = aligned_empty(a.shape, a.dtype)  # aligned: written with O_DIRECT
        np.copyto(buf, a)
        return buf

    def _guarded(self, fn) -> None:
        try:
            fn()
        except BaseException as e:  # surfaced by the next wait(), on the training thread
            self._error = e

    def _persist(self, path: Path, payload: Payload) -> None:
        t0 = time.perf_counter()
        self.bytes_written = write_checkpoint(path, payload)
        self.last_write_s = time.perf_counter() - t0
        for old in list_checkpoints(self.run_dir)[: -self.keep]:
            old.unlink(missing_ok=True)

    def wait(self) -> None:
        """Block until the write in flight (if any) is committed; re-raise its error here."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._snapped = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
