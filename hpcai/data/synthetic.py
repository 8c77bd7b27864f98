"""Generated data for the model zoo: synthetic images, synthetic token streams, token windows of a text file.

    hpcai data build synthetic-images --out data/synth-img                  # 4,096 of 3x32x32, 10 classes
    hpcai data build synthetic-images:n=512,size=16,classes=4 --out /tmp/img
    hpcai data build synthetic-tokens --out data/synth-tok                  # 4,096 windows of 64, vocab 64
    hpcai data build synthetic-tokens:n=1024,seq=32,vocab=32 --out /tmp/tok
    hpcai data build corpus.txt --out data/corpus                           # byte tokens (vocab 256), seq 64
    hpcai data build corpus.txt:seq=128 --out data/corpus128

A source name is ``NAME[:key=value,...]``. Everything is generated from ``seed`` alone (no network, no files
for the synthetic kinds), so every rank of a parallel build generates the same rows.

- ``synthetic-images``: x (N, 3, size, size) float32, y (N,) class ids. Each class has a smooth random colour
  pattern (a 4x4 grid of random colours, upsampled); a sample is its class pattern shifted by up to ``size/8``
  pixels, scaled by a random contrast, plus Gaussian noise of std ``noise``. A CNN learns it in a few epochs;
  chance is 1/classes.
- ``synthetic-tokens``: x (N, seq) int64 tokens, y (N, seq) = x shifted by one (next-token targets). A Markov
  chain: each token has one favoured successor taken with probability ``p``, else a uniform token; the best
  possible next-token accuracy is about ``p + (1 - p) / vocab``.
- ``FILE.txt``: the file's bytes as tokens (vocab 256), cut into windows of ``seq + 1`` bytes with stride
  ``seq``; x is each window's first ``seq`` bytes, y its last ``seq``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hpcai.data.manifest import MAX_CLASSES
from hpcai.errors import DatasetError

# kind -> default options (the types of the defaults are the types accepted)
GENERATED: dict[str, dict[str, int | float]] = {
    "synthetic-images": {"n": 4096, "size": 32, "classes": 10, "noise": 1.0, "seed": 0},
    "synthetic-tokens": {"n": 4096, "seq": 64, "vocab": 64, "p": 0.8, "seed": 0},
    "text": {"seq": 64},
}


def is_generated(source: str) -> bool:
    """True for the names this module builds (``synthetic-*``, or a ``.txt`` file with optional options)."""
    name = source.split(":", 1)[0]
    return name in GENERATED or name.endswith(".txt")


def parse_source(source: str) -> tuple[str, str, dict[str, int | float]]:
    """``'synthetic-tokens:n=8,seq=4'`` -> (kind, path or '', options with defaults filled in).

    Unknown keys, bad numbers and out-of-range values are a :class:`DatasetError` naming the source.
    """
    name, _, opts = source.partition(":")
    kind = "text" if name.endswith(".txt") else name
    if kind not in GENERATED:
        raise DatasetError(f"{source}: unknown generated source (want {', '.join(GENERATED)} or FILE.txt)")
    values = dict(GENERATED[kind])
    for item in filter(None, (s.strip() for s in opts.split(","))):
        key, sep, text = item.partition("=")
        if not sep or key not in values:
            raise DatasetError(f"{source}: bad option {item!r}; valid: {', '.join(f'{k}=' for k in values)}")
        try:
            values[key] = type(values[key])(text)
        except ValueError:
            raise DatasetError(
                f"{source}: {key}: expected {type(values[key]).__name__}, got {text!r}"
            ) from None
    positive = [k for k in ("n", "size", "classes", "seq", "vocab") if k in values and values[k] < 1]
    if positive:
        raise DatasetError(f"{source}: {positive[0]} must be >= 1, got {values[positive[0]]}")
    if kind == "synthetic-images" and (values["classes"] < 2 or values["size"] < 4 or values["noise"] < 0):
        raise DatasetError(f"{source}: need classes >= 2, size >= 4 and noise >= 0, got {values}")
    if kind == "synthetic-tokens" and (values["vocab"] < 2 or not 0 <= values["p"] <= 1):
        raise DatasetError(f"{source}: need vocab >= 2 and 0 <= p <= 1, got {values}")
    for key in ("classes", "vocab"):
        if values.get(key, 0) > MAX_CLASSES:
            raise DatasetError(f"{source}: {key} must be at most {MAX_CLASSES:,}, got {values[key]:,}")
    return kind, name if kind == "text" else "", values


def synthetic_images(n: int, size: int, classes: int, noise: float, seed: int) -> tuple[np.ndarray, ...]:
    """(x (n, 3, size, size) float32, y (n,) int64): shifted, scaled class patterns plus noise."""
    rng = np.random.default_rng([seed, 1])
    cells = max(1, size // 4)  # 4x4 grid of colour cells per class pattern
    grid = rng.normal(0.0, 1.0, (classes, 3, 4, 4))
    protos = np.kron(grid, np.ones((1, 1, cells, cells)))[:, :, :size, :size]
    if protos.shape[-1] < size:  # size not a multiple of 4: pad by repeating the edge
        pad = size - protos.shape[-1]
        protos = np.pad(protos, ((0, 0), (0, 0), (0, pad), (0, pad)), mode="edge")
    # A 3-tap box blur along both axes softens the cell edges: shifted patterns then overlap smoothly.
    for axis in (2, 3):
        protos = (np.roll(protos, 1, axis) + protos + np.roll(protos, -1, axis)) / 3
    y = rng.integers(0, classes, n)
    shift = max(1, size // 8)
    dy, dx = rng.integers(-shift, shift + 1, (2, n))
    contrast = rng.uniform(0.7, 1.3, n)
    x = np.empty((n, 3, size, size), np.float32)
    for i in range(n):  # n is small (thousands): a loop of rolls is clearer than fancy indexing
        x[i] = contrast[i] * np.roll(protos[y[i]], (dy[i], dx[i]), axis=(1, 2))
    x += rng.normal(0.0, noise, x.shape).astype(np.float32)
    return x, y.astype(np.int64)


def synthetic_tokens(n: int, seq: int, vocab: int, p: float, seed: int) -> tuple[np.ndarray, ...]:
    """(x (n, seq) int64, y (n, seq) int64 = x shifted by one): a Markov chain with favoured successors."""
    rng = np.random.default_rng([seed, 2])
    successor = rng.permutation(vocab)
    w = np.empty((n, seq + 1), np.int64)
    w[:, 0] = rng.integers(0, vocab, n)
    for t in range(1, seq + 1):  # one column at a time: all n windows advance together
        keep = rng.random(n) < p
        w[:, t] = np.where(keep, successor[w[:, t - 1]], rng.integers(0, vocab, n))
    return w[:, :-1].copy(), w[:, 1:].copy()


def text_windows(path: Path, seq: int) -> tuple[np.ndarray, ...]:
    """Byte tokens of ``path`` in windows of seq + 1 with stride seq: (x (n, seq), y (n, seq)) int64."""
    try:
        data = np.frombuffer(path.read_bytes(), np.uint8).astype(np.int64)
    except OSError as e:
        raise DatasetError(f"{path}: cannot read: {e}") from None
    n = (len(data) - 1) // seq
    if n < 2:
        raise DatasetError(f"{path}: {len(data)} bytes make fewer than 2 windows of {seq + 1} tokens")
    starts = np.arange(n) * seq
    idx = starts[:, None] + np.arange(seq + 1)[None, :]  # (n, seq + 1) window positions
    w = data[idx]
    return w[:, :-1].copy(), w[:, 1:].copy()


def open_generated(source: str):
    """The :class:`~hpcai.data.sources.Source` for a generated source name (see the module docstring)."""
    kind, path, opts = parse_source(source)
    try:
        return _generate(source, kind, path, opts)
    except MemoryError:
        raise DatasetError(f"{source}: too large to generate in this process's memory") from None


def _generate(source: str, kind: str, path: str, opts: dict):
    from hpcai.data.sources import Source

    if kind == "synthetic-images":
        x, y = synthetic_images(**opts)  # type: ignore[arg-type]
        return Source(source, x, y, tuple(x.shape[1:]), x.dtype, num_classes=int(opts["classes"]))
    if kind == "synthetic-tokens":
        x, y = synthetic_tokens(**opts)  # type: ignore[arg-type]
        return Source(source, x, y, tuple(x.shape[1:]), x.dtype, num_classes=int(opts["vocab"]))
    if not Path(path).is_file():
        raise DatasetError(f"{path}: no such text file")
    x, y = text_windows(Path(path), int(opts["seq"]))
    return Source(source, x, y, tuple(x.shape[1:]), x.dtype, num_classes=256)
