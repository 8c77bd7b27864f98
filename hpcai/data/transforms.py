"""Batch transforms run in the loader's reader threads: normalise with the manifest's statistics, and a seeded
random crop + horizontal flip for images.

Randomness is drawn for the whole global batch from (seed, epoch, step), and each rank takes its slice: a
sample gets the same augmentation whatever the rank count, and a run resumed at (epoch, step) repeats it.
"""

from __future__ import annotations

import numpy as np


class Normalize:
    """``(x - mean) / std`` as float32, per channel when the manifest has channel statistics."""

    def __init__(self, mean, std):
        self.mean = np.asarray(mean, np.float32)
        self.std = np.maximum(np.asarray(std, np.float32), 1e-12)

    @classmethod
    def from_manifest(cls, manifest: dict) -> Normalize:
        n = manifest["normalization"]
        if len(manifest["sample_shape"]) >= 2 and "channel_mean" in n:
            shape = (-1,) + (1,) * (
                len(manifest["sample_shape"]) - 1
            )  # (C, 1, 1): broadcast over (B, C, H, W)
            return cls(np.reshape(n["channel_mean"], shape), np.reshape(n["channel_std"], shape))
        return cls(n["mean"], n["std"])

    def __call__(self, x: np.ndarray, epoch: int, step: int, offset: int, global_batch: int) -> np.ndarray:
        return (x.astype(np.float32) - self.mean) / self.std


class RandomCropFlip:
    """Pad ``pad`` pixels (zeros), crop back to (H, W) at a random offset, flip left-right with p = 0.5.

    For (B, C, H, W) batches.
    """

    def __init__(self, seed: int, pad: int = 2, flip: bool = True):
        self.seed, self.pad, self.flip = seed, pad, flip

    def __call__(self, x: np.ndarray, epoch: int, step: int, offset: int, global_batch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, step, 0xC0])
        dy, dx = rng.integers(0, 2 * self.pad + 1, size=(2, global_batch))[:, offset : offset + len(x)]
        flips = rng.random(global_batch)[offset : offset + len(x)] < 0.5
        p = self.pad
        padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
        h, w = x.shape[2:]
        out = np.empty_like(x)
        for i in range(len(x)):
            crop = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
            out[i] = crop[:, :, ::-1] if self.flip and flips[i] else crop
        return out


class Compose:
    def __init__(self, *transforms):
        self.transforms = transforms

    def __call__(self, x: np.ndarray, epoch: int, step: int, offset: int, global_batch: int) -> np.ndarray:
        for t in self.transforms:
            x = t(x, epoch, step, offset, global_batch)
        return x
