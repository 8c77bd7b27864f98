"""``hpcai inspect``: what a checkpoint holds, or which checkpoint a run directory would resume from.

hpcai inspect runs/digits/checkpoints/step-00000440.h5 [--json]
hpcai inspect runs/digits [--json]

A checkpoint that fails its checks is still described as far as it can be read; for a single file the
verdict is then also the one-line error (exit status 2), so scripts can rely on the status.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpcai import checkpoint as ckpt
from hpcai.errors import UserError

_SHOWN = ("step", "epoch", "step_in_epoch", "world_size", "spec_sha256", "created", "last_loss", "version")


def describe(path: Path) -> dict[str, Any]:
    """Metadata, tensors (shape, dtype) and the checksum verdict of one checkpoint file."""
    try:
        info: dict[str, Any] = {"file": str(path), "bytes": path.stat().st_size}
    except OSError as e:  # e.g. a dangling symlink among the checkpoints
        return {"file": str(path), "bytes": 0, "checksums": f"FAILED: {path}: {e.strerror}", "tensors": {}}
    try:
        p = ckpt.read_checkpoint(path, verify=True)
        info["checksums"] = "ok"
        info["attributes"] = (
            f"covered by the checksum {ckpt.META_CRC}"
            if p.attrs_checked
            else "not covered by a checksum (format version 1: tensors only)"
        )
    except ckpt.CheckpointError as e:
        info["checksums"] = f"FAILED: {e}"
    info.update(_contents(path))
    return info


def _contents(path: Path) -> dict[str, Any]:
    """What can be read of the file, whatever its state: each unreadable piece is noted, never raised."""
    tensors: dict[str, Any] = {}
    attrs: dict[str, Any] = {}
    try:
        with h5py.File(path, "r", locking=False) as f:
            for key in f.attrs:
                try:
                    value = f.attrs[key]
                except (OSError, ValueError, TypeError, KeyError):
                    continue
                attrs[key] = value.item() if isinstance(value, np.generic) else value
            names: list[str] = []
            f.visit(names.append)
            for name in names:
                try:
                    obj = f[name]
                except (KeyError, OSError, ValueError, RuntimeError) as e:
                    tensors[name] = {"error": " ".join(str(e).split())}
                    continue
                if isinstance(obj, h5py.Dataset):
                    tensors[name] = {"shape": list(obj.shape), "dtype": str(obj.dtype)}
    except (OSError, ValueError, RuntimeError) as e:
        return {"error": f"unreadable: {' '.join(str(e).split())}"}
    out: dict[str, Any] = {k: attrs[k] for k in _SHOWN if k in attrs}
    if "versions" in attrs:
        try:
            out["versions"] = json.loads(attrs["versions"])
        except (TypeError, ValueError):
            out["versions"] = attrs["versions"]
    out["tensors"] = tensors
    return out


def inspect_target(target: Path, as_json: bool = False) -> int:
    if target.is_dir():
        files = ckpt.list_checkpoints(target)
        if not files:
            raise UserError(f"{target}: no checkpoints in {ckpt.checkpoint_dir(target)}")
        rows = [describe(p) for p in files]
        chosen = next((r["file"] for r in reversed(rows) if r.get("checksums") == "ok"), None)
        if as_json:
            print(json.dumps({"checkpoints": rows, "resume_from": chosen}, indent=2, default=str))
            return 0
        for r in rows:
            mark = "  <- resume" if r["file"] == chosen else ""
            v1 = " (attributes unchecked: format version 1)" if "version 1" in r.get("attributes", "") else ""
            print(
                f"{Path(r['file']).name}  step {r.get('step', '?')}  world {r.get('world_size', '?')}  "
                f"{r['bytes'] / 1e6:.1f} MB  checksums {r['checksums']}{v1}{mark}"
            )
        if chosen is None:
            print("no valid checkpoint: a rerun starts from scratch")
        return 0
    if not target.is_file():
        raise UserError(f"{target}: no such checkpoint file or run directory")
    info = describe(target)
    if as_json:
        print(json.dumps(info, indent=2, default=str))
    else:
        for key, value in info.items():
            if key != "tensors":
                print(f"{key}: {value}")
        print("tensors:")
        for name, t in info.get("tensors", {}).items():
            what = f"unreadable: {t['error']}" if "error" in t else f"{tuple(t['shape'])}  {t['dtype']}"
            print(f"  /{name}  {what}")
    if info["checksums"] != "ok":  # described above; the verdict is the error
        raise ckpt.CheckpointError(info["checksums"].removeprefix("FAILED: "))
    return 0
