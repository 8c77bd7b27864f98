"""``hpcai inspect``: what a checkpoint holds, or which checkpoint a run directory would resume from.

hpcai inspect runs/digits/checkpoints/step-00000440.h5 [--json]
hpcai inspect runs/digits [--json]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py

from hpcai import checkpoint as ckpt
from hpcai.errors import UserError


def describe(path: Path) -> dict[str, Any]:
    """Metadata, tensors (shape, dtype) and the checksum verdict of one checkpoint file."""
    info: dict[str, Any] = {"file": str(path), "bytes": path.stat().st_size}
    try:
        ckpt.read_checkpoint(path, verify=True)
        info["checksums"] = "ok"
    except ckpt.CheckpointError as e:
        info["checksums"] = f"FAILED: {e}"
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
            tensors = {}
            f.visititems(
                lambda name, obj: (
                    tensors.__setitem__(name, {"shape": list(obj.shape), "dtype": str(obj.dtype)})
                    if isinstance(obj, h5py.Dataset)
                    else None
                )
            )
    except OSError as e:
        info["error"] = f"unreadable: {e}"
        return info
    for key in ("step", "epoch", "step_in_epoch", "world_size", "spec_sha256", "created", "last_loss"):
        if key in attrs:
            info[key] = attrs[key]
    if "versions" in attrs:
        info["versions"] = json.loads(attrs["versions"])
    info["tensors"] = tensors
    return info


def inspect_target(target: Path, as_json: bool = False) -> int:
    if target.is_dir():
        files = ckpt.list_checkpoints(target)
        if not files:
            raise UserError(f"{target}: no checkpoints in {ckpt.checkpoint_dir(target)}")
        rows = [describe(p) for p in files]
        chosen = next((r["file"] for r in reversed(rows) if r.get("checksums") == "ok"), None)
        if as_json:
            print(json.dumps({"checkpoints": rows, "resume_from": chosen}, indent=2))
            return 0
        for r in rows:
            mark = "  <- resume" if r["file"] == chosen else ""
            print(
                f"{Path(r['file']).name}  step {r.get('step', '?')}  world {r.get('world_size', '?')}  "
                f"{r['bytes'] / 1e6:.1f} MB  checksums {r['checksums']}{mark}"
            )
        if chosen is None:
            print("no valid checkpoint: a rerun starts from scratch")
        return 0
    if not target.is_file():
        raise UserError(f"{target}: no such checkpoint file or run directory")
    info = describe(target)
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key != "tensors":
            print(f"{key}: {value}")
    print("tensors:")
    for name, t in info.get("tensors", {}).items():
        print(f"  /{name}  {tuple(t['shape'])}  {t['dtype']}")
    return 0
