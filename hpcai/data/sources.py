"""Raw data sources for ``hpcai data build``: each gives (x, y) rows by index, validated, without loading more
than a rank needs where the format allows it.

Supported SOURCE arguments:

- ``digits``: scikit-learn's bundled 8x8 digits (no network).
- ``FILE.npz``: arrays ``x`` (N, *shape) numeric and ``y`` (N,) integer labels. Uncompressed members
  (``np.savez``) are memory-mapped, so each rank reads only its own rows.
- ``DIR`` of ``.npy`` files: ``x.npy`` + ``y.npy`` (split by the fractions), or per-split files
  ``train_x.npy``/``train_y.npy`` + ``test_x.npy``/``test_y.npy`` (+ optional ``val_x.npy``/``val_y.npy``),
  kept as given. Memory-mapped.
- ``FILE.csv``: a header row; the label column (``--label-column``, default ``label``) holds integers or class
  names (sorted into class ids); every other column is a numeric feature -> x (N, F) float32.
- ``DIR`` of images: one subfolder per class (sorted names are class ids 0..C-1), all images the same size;
  decoded with Pillow to uint8 (C, H, W), only on the rank that writes them.
"""

from __future__ import annotations

import csv
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpcai.errors import DatasetError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SPLITS = ("train", "val", "test")


@dataclass
class Source:
    """Rows of a source: ``x`` may be a memory map or an :class:`ImageRows`; ``y`` is in memory (small)."""

    name: str  # what the user typed: errors name it
    x: object  # indexable by a sorted int array -> (k, *sample_shape) ndarray
    y: np.ndarray  # (N,) int64
    sample_shape: tuple[int, ...]
    x_dtype: np.dtype
    splits: dict[str, np.ndarray] | None = None  # predefined split -> row indices; None: split by fraction
    classes: list[str] | None = None
    files: dict[str, Path] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)

    def rows(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``idx`` (sorted) as (x, y); non-finite floats are an error naming the source and the row."""
        x = np.asarray(self.x[idx])
        if x.dtype.kind == "f":
            bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
            if bad.any():
                raise DatasetError(f"{self.name}: x has NaN or inf in row {int(idx[np.argmax(bad)])}")
        return x, self.y[idx]


class ImageRows:
    """Lazily decoded images: indexing decodes only the rows asked for."""

    def __init__(self, paths: list[Path], mode: str, size: tuple[int, int]):
        self.paths, self.mode, self.size = paths, mode, size

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        return np.stack([decode_image(self.paths[i], self.mode, self.size) for i in idx])


def decode_image(path: Path, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if size is not None and im.size != size:
                raise DatasetError(
                    f"{path}: image is {im.size[0]}x{im.size[1]}, the others {size[0]}x{size[1]}"
                )
            a = np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read image: {e}") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # (C, H, W)


def _check_xy(name: str, x, y) -> tuple[np.ndarray, np.ndarray]:
    if x.dtype == object or y.dtype == object:
        raise DatasetError(f"{name}: x/y are object arrays (ragged rows?); need one numeric array each")
    if x.ndim < 1 or x.dtype.kind not in "biuf":
        raise DatasetError(f"{name}: x must be a numeric array (N, ...), got {x.dtype} {x.shape}")
    if y.ndim != 1:
        raise DatasetError(f"{name}: y must be 1-D labels (N,), got shape {y.shape}")
    if len(x) != len(y):
        raise DatasetError(f"{name}: x has {len(x)} rows but y has {len(y)}")
    if len(y) == 0:
        raise DatasetError(f"{name}: no rows")
    if y.dtype.kind not in "biu":
        if y.dtype.kind != "f" or not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DatasetError(f"{name}: y must hold integer class labels, got {y.dtype}")
    y = np.asarray(y).astype(np.int64)
    if y.min() < 0:
        raise DatasetError(f"{name}: y has negative label {int(y.min())}")
    return x, y


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:  # object arrays refuse to load without pickle: ragged data
        raise DatasetError(f"{path}: {e} (ragged rows?)") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read: {e}") from None


def _npz_member(path: Path, zf: zipfile.ZipFile, key: str) -> np.ndarray:
    """Memory-map an uncompressed .npz member (np.savez); load a compressed one (np.savez_compressed)."""
    try:
        info = zf.getinfo(f"{key}.npy")
    except KeyError:
        raise DatasetError(f"{path}: array '{key}' missing (found {sorted(zf.namelist())})") from None
    if info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            start = (
                info.header_offset
                + 30
                + int.from_bytes(local[26:28], "little")
                + int.from_bytes(local[28:30], "little")
            )
            f.seek(start)
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            if dtype.hasobject:
                raise DatasetError(f"{path}: '{key}' is an object array (ragged rows?)")
            if not fortran:
                return np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape)
    try:
        with zf.open(info) as member:
            return np.lib.format.read_array(member, allow_pickle=False)
    except ValueError as e:
        raise DatasetError(f"{path}: '{key}': {e} (ragged rows?)") from None


def load_npz(path: Path) -> Source:
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise DatasetError(f"{path}: not a readable .npz: {e}") from None
    with zf:
        x, y = _npz_member(path, zf, "x"), np.asarray(_npz_member(path, zf, "y"))
    x, y = _check_xy(str(path), x, y)
    return Source(str(path), x, y, tuple(x.shape[1:]), x.dtype)


def load_npy_dir(path: Path) -> Source:
    if (path / "x.npy").is_file():
        x, y = _check_xy(str(path), _load_npy(path / "x.npy"), np.asarray(_load_npy(path / "y.npy")))
        return Source(str(path), x, y, tuple(x.shape[1:]), x.dtype)
    parts = {}
    for split in SPLITS:
        px, py = path / f"{split}_x.npy", path / f"{split}_y.npy"
        if px.is_file() or py.is_file():
            if not (px.is_file() and py.is_file()):
                raise DatasetError(f"{path}: {px.name} and {py.name} must come together")
            parts[split] = _check_xy(f"{px}", _load_npy(px), np.asarray(_load_npy(py)))
    if "train" not in parts or "test" not in parts:
        raise DatasetError(f"{path}: need x.npy + y.npy, or train_x/train_y.npy and test_x/test_y.npy")
    shapes = {s: (p[0].shape[1:], p[0].dtype) for s, p in parts.items()}
    if len(set(shapes.values())) != 1:
        raise DatasetError(f"{path}: per-split x arrays differ in shape/dtype: {shapes}")
    x = np.concatenate([p[0] for p in parts.values()])  # per-split files are read whole: fine for their size
    y = np.concatenate([p[1] for p in parts.values()])
    bounds = np.cumsum([0] + [len(p[1]) for p in parts.values()])
    splits = {s: np.arange(bounds[i], bounds[i + 1]) for i, s in enumerate(parts)}
    return Source(str(path), x, y, tuple(x.shape[1:]), x.dtype, splits=splits)


def load_csv(path: Path, label_column: str) -> Source:
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header:
                raise DatasetError(f"{path}: empty CSV (need a header row)")
            if label_column not in header:
                raise DatasetError(
                    f"{path}: no label column '{label_column}' (columns: {header}); see --label-column"
                )
            li = header.index(label_column)
            feats, labels = [], []
            for line, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != len(header):
                    raise DatasetError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
                try:
                    feats.append([float(v) for i, v in enumerate(row) if i != li])
                except ValueError as e:
                    raise DatasetError(f"{path}:{line}: {e}") from None
                labels.append(row[li].strip())
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read: {e}") from None
    x = np.asarray(feats, dtype=np.float32).reshape(len(feats), len(header) - 1)
    classes = None
    try:
        y = np.asarray([int(v) for v in labels], dtype=np.int64)
    except ValueError:  # class names: sorted names are the ids
        classes = sorted(set(labels))
        lookup = {c: i for i, c in enumerate(classes)}
        y = np.asarray([lookup[v] for v in labels], dtype=np.int64)
    x, y = _check_xy(str(path), x, y)
    return Source(str(path), x, y, tuple(x.shape[1:]), x.dtype, classes=classes)


def load_image_dir(path: Path) -> Source:
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths, labels = [], []
    for c, name in enumerate(classes):
        files = sorted(p for p in (path / name).iterdir() if p.suffix.lower() in IMAGE_EXTS)
        paths += files
        labels += [c] * len(files)
    if not paths:
        raise DatasetError(f"{path}: no images found (expected one subfolder per class holding image files)")
    from PIL import Image

    first = paths[0]
    try:
        with Image.open(first) as im:
            mode = "L" if im.mode in ("L", "1", "I", "I;16", "F") else "RGB"
            size = im.size
    except OSError as e:
        raise DatasetError(f"{first}: cannot read image: {e}") from None
    shape = decode_image(first, mode, size).shape
    return Source(
        str(path),
        ImageRows(paths, mode, size),
        np.asarray(labels, np.int64),
        shape,
        np.dtype(np.uint8),
        classes=classes,
    )


def load_digits_source() -> Source:
    from hpcai.data.etl import load_digits_arrays

    x, y = load_digits_arrays()
    return Source("digits", x, y, tuple(x.shape[1:]), x.dtype)


def open_source(source: str, label_column: str = "label") -> Source:
    """The source named on the command line (see the module docstring for what each kind needs)."""
    if source == "digits":
        return load_digits_source()
    p = Path(source)
    if not p.exists():
        raise DatasetError(
            f"{source}: no such file or directory (sources: digits, .npz, .csv, .npy dir, image dir)"
        )
    if p.is_file() and p.suffix == ".npz":
        return load_npz(p)
    if p.is_file() and p.suffix == ".csv":
        return load_csv(p, label_column)
    if p.is_dir():
        if any(p.glob("*.npy")):
            return load_npy_dir(p)
        return load_image_dir(p)
    raise DatasetError(
        f"{source}: unknown source kind (want digits, FILE.npz, FILE.csv, a .npy dir or an image dir)"
    )
