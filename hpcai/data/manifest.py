"""What a dataset's ``manifest.json`` may hold, checked before anything is read or allocated from it.

A damaged manifest (a key misspelt, ``num_classes: "ten"``, ``sample_shape: "abc"``, ``x_dtype: "object"``,
``splits: []``, a split without ``shards``) used to surface as a ValueError, KeyError or AttributeError
traceback in ``hpcai data info`` and in every rank of ``hpcai run``. :func:`validate_manifest` checks the
whole manifest (keys, types, dtypes from :data:`X_DTYPES`, shapes, split names, shard lists) and raises one
:class:`DatasetError` naming the file and the key: ``DIR/manifest.json: num_classes: must be an integer,
got 'ten'``.

Bounds that protect the trainer: ``num_classes`` is at most :data:`MAX_CLASSES` (2^20; a label of 10^9 made
training allocate a 256 GB output layer), and a sample at most :data:`MAX_SAMPLE_ELEMENTS` values.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from hpcai.errors import DatasetError

FORMAT = "hpcai-sharded-hdf5"
FORMAT_VERSION = 2
MAX_CLASSES = 1 << 20  # class ids (or token ids) 0 .. 2^20 - 1: a 2^20-way output layer is already large
MAX_SAMPLE_ELEMENTS = 1 << 31
# The element types hpcai builds and reads (numpy's names): no objects, strings, complex or extended floats.
X_DTYPES = (
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
)
SPLITS = ("train", "val", "test")
COMPRESSIONS = ("none", "gzip", "lzf")
CHECKSUMS = ("crc32c", "fletcher32", "none")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_KNOWN = (
    "format",
    "version",
    "source",
    "sample_shape",
    "x_dtype",
    "y_dtype",
    "y_shape",
    "num_classes",
    "classes",
    "split_seed",
    "test_fraction",
    "val_fraction",
    "compression",
    "checksum",
    "chunk_rows",
    "normalization",
    "built_with_ranks",
    "splits",
)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def validate_manifest(m: object, path: str | Path) -> dict:
    """Check a parsed ``manifest.json`` (``path`` names it in errors); return it. Raises DatasetError."""

    def fail(key: str, why: str) -> None:
        raise DatasetError(f"{path}: {key}: {why}")

    if not isinstance(m, dict):
        raise DatasetError(f"{path}: must hold a JSON object, got {type(m).__name__}")
    for key in m:
        close = difflib.get_close_matches(str(key), _KNOWN, n=1, cutoff=0.8)
        if key not in _KNOWN and close:  # far from every known key: someone's own note, left alone
            fail(key, f"unknown key (did you mean '{close[0]}'?)")
    for key in ("sample_shape", "num_classes", "splits"):
        if key not in m:
            fail(key, "missing")
    if "format" in m and m["format"] != FORMAT:
        fail("format", f"must be {FORMAT!r}, got {m['format']!r}")
    if "version" in m and (not _is_int(m["version"]) or not 1 <= m["version"] <= FORMAT_VERSION):
        fail("version", f"must be an integer 1..{FORMAT_VERSION} (newer hpcai?), got {m['version']!r}")
    shape = m["sample_shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 1 for d in shape):  # []: scalar samples
        fail("sample_shape", f"must be a list of integers >= 1, got {shape!r}")
    elements = 1
    for d in shape:
        elements *= d
    if elements > MAX_SAMPLE_ELEMENTS:
        fail("sample_shape", f"{shape} holds {elements:,} values per sample, over {MAX_SAMPLE_ELEMENTS:,}")
    if "x_dtype" in m and m["x_dtype"] not in X_DTYPES:
        fail("x_dtype", f"must be one of {', '.join(X_DTYPES)}, got {m['x_dtype']!r}")
    if "y_dtype" in m and m["y_dtype"] != "int64":
        fail("y_dtype", f"must be 'int64', got {m['y_dtype']!r}")
    y_shape = m.get("y_shape", [])
    if not isinstance(y_shape, list) or not all(_is_int(d) and d >= 1 for d in y_shape):
        fail("y_shape", f"must be a list of integers >= 1, got {y_shape!r}")
    n = m["num_classes"]
    if not _is_int(n):
        fail("num_classes", f"must be an integer, got {n!r}")
    if not 1 <= n <= MAX_CLASSES:
        fail("num_classes", f"must be 1..{MAX_CLASSES:,}, got {n:,}")
    classes = m.get("classes")
    if classes is not None and (
        not isinstance(classes, list) or len(classes) != n or not all(isinstance(c, str) for c in classes)
    ):
        fail("classes", f"must be null or a list of {n} names")
    if m.get("compression", "none") not in COMPRESSIONS:
        fail("compression", f"must be one of {', '.join(COMPRESSIONS)}, got {m['compression']!r}")
    if m.get("checksum", "none") not in CHECKSUMS:
        fail("checksum", f"must be one of {', '.join(CHECKSUMS)}, got {m['checksum']!r}")
    for key in ("chunk_rows", "built_with_ranks"):
        if key in m and (not _is_int(m[key]) or m[key] < 1):
            fail(key, f"must be an integer >= 1, got {m[key]!r}")
    for key in ("test_fraction", "val_fraction"):
        if m.get(key) is not None and (not _is_number(m[key]) or not 0 <= m[key] < 1):
            fail(key, f"must be null or a number in [0, 1), got {m[key]!r}")
    if "source" in m and not isinstance(m["source"], str):
        fail("source", f"must be a string, got {m['source']!r}")
    _check_normalization(m.get("normalization", {}), shape, fail)
    _check_splits(m["splits"], fail)
    return m


def _check_normalization(norm: object, shape: list, fail) -> None:
    if not isinstance(norm, dict):
        fail("normalization", f"must be an object, got {norm!r}")
    for key in ("mean", "std"):
        if key in norm and not _is_number(norm[key]):
            fail(f"normalization.{key}", f"must be a number, got {norm[key]!r}")
    for key in ("channel_mean", "channel_std"):
        v = norm.get(key)
        if v is None:
            continue
        channels = shape[0] if len(shape) >= 2 else 1
        if not isinstance(v, list) or len(v) != channels or not all(_is_number(c) for c in v):
            fail(f"normalization.{key}", f"must be a list of {channels} numbers (one per channel)")


def _check_splits(splits: object, fail) -> None:
    if not isinstance(splits, dict):
        fail("splits", f"must be an object {{split name: {{rows, shards}}}}, got {splits!r}")
    for name in splits:
        if name not in SPLITS:
            fail(f"splits.{name}", f"unknown split (the splits are {', '.join(SPLITS)})")
    for name in ("train", "test"):
        if name not in splits:
            fail(f"splits.{name}", "missing (a dataset needs a train and a test split)")
    for name, entry in splits.items():
        key = f"splits.{name}"
        if not isinstance(entry, dict):
            fail(key, f"must be an object {{rows, shards}}, got {entry!r}")
        if not _is_int(entry.get("rows")) or entry["rows"] < 1:
            fail(f"{key}.rows", f"must be an integer >= 1, got {entry.get('rows')!r}")
        shards = entry.get("shards")
        if not isinstance(shards, list) or not shards:
            fail(f"{key}.shards", "missing or empty (a non-empty list of shard files)")
        total = 0
        for i, s in enumerate(shards):
            sk = f"{key}.shards[{i}]"
            if not isinstance(s, dict):
                fail(sk, f"must be an object {{file, rows, ...}}, got {s!r}")
            f = s.get("file")
            # A plain name inside the dataset directory: never a path that reads someone else's file.
            if not isinstance(f, str) or not f or "/" in f or "\\" in f or f in (".", ".."):
                fail(f"{sk}.file", f"must be a file name in the dataset directory, got {f!r}")
            if not _is_int(s.get("rows")) or s["rows"] < 0:
                fail(f"{sk}.rows", f"must be an integer >= 0, got {s.get('rows')!r}")
            if "bytes" in s and (not _is_int(s["bytes"]) or s["bytes"] < 0):
                fail(f"{sk}.bytes", f"must be an integer >= 0, got {s['bytes']!r}")
            if "sha256" in s and (not isinstance(s["sha256"], str) or not _SHA256.fullmatch(s["sha256"])):
                fail(f"{sk}.sha256", "must be 64 lowercase hex digits")
            total += s["rows"]
        if total != entry["rows"]:
            fail(f"{key}.rows", f"is {entry['rows']} but its shards hold {total}")
