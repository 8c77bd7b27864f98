"""Cutting a sequential model into pipeline stages. No MPI here.

A model for the pipeline is an ``nn.Sequential`` (or a list of blocks, made one): its top-level modules run
one after the other, so stage ``s`` is the consecutive range ``[bounds[s], bounds[s+1])`` of them. A stage is
again an ``nn.Sequential`` whose children keep their indices in the whole model as names (``"3"``, ``"4"``),
so a stage's ``state_dict`` keys (``3.weight``) are exactly the whole model's: checkpoints gathered from the
stages load into the whole model, and back.

Cut by
- ``"layers"``: equal numbers of *layers with parameters* per stage (a parameter-free module such as ReLU or
  Flatten travels with the layer before it; leading ones with the first);
- ``"params"``: consecutive groups whose largest parameter count is as small as possible (balanced stages);
- explicit split points ``[i1, i2, ...]``: stage s starts at top-level index ``i_s``.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from hpcai.errors import SpecError


def as_sequential(model: nn.Module | list[nn.Module]) -> nn.Sequential:
    if isinstance(model, nn.Sequential):
        return model
    if isinstance(model, (list, tuple, nn.ModuleList)) and all(isinstance(m, nn.Module) for m in model):
        return nn.Sequential(*model)
    raise SpecError(
        "train.strategy: the pipeline needs an nn.Sequential or a list of blocks, got "
        f"{type(model).__name__} (return nn.Sequential(...) from your factory)"
    )


def _blocks(model: nn.Sequential) -> list[tuple[int, int, int]]:
    """(start, stop, params) of each block: a layer with parameters plus the parameter-free ones after it."""
    counts = [sum(p.numel() for p in m.parameters()) for m in model]
    starts = [i for i, c in enumerate(counts) if c > 0]
    if not starts:
        return [(0, len(model), 0)]
    starts[0] = 0  # leading parameter-free modules (Flatten) join the first block
    stops = starts[1:] + [len(model)]
    return [(a, b, sum(counts[a:b])) for a, b in zip(starts, stops, strict=True)]


def _balanced(sizes: list[int], parts: int) -> list[int]:
    """Cut points (indices into ``sizes``) of ``parts`` consecutive groups minimising the largest group sum.

    Dynamic programming over (items, groups): a few dozen blocks, so O(parts * n^2) is nothing.
    """
    n = len(sizes)
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]  # best[k][i]: first i items in k groups
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):  # last group is items j..i-1 (non-empty)
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    points, i = [], n
    for k in range(parts, 0, -1):
        i = cut[k][i]
        points.append(i)
    return sorted(points)[1:]  # drop the leading 0


def stage_bounds(model: nn.Sequential, stages: int, split: str | list[int]) -> list[int]:
    """Top-level indices ``[0, b1, ..., len(model)]``: stage s holds modules ``bounds[s]:bounds[s+1]``."""
    n = len(model)
    if not isinstance(split, str):
        bounds = [0, *split, n]
        if len(bounds) != stages + 1 or any(b <= a for a, b in zip(bounds, bounds[1:], strict=False)):
            raise SpecError(
                f"parallel.split: {split} does not cut the model's {n} top-level modules into {stages} "
                f"non-empty stages (points must be increasing, in 1..{n - 1})"
            )
        return bounds
    blocks = _blocks(model)
    if len(blocks) < stages:
        raise SpecError(
            f"parallel.stages: {stages} stages, but the model has only {len(blocks)} layers with parameters "
            "(use a deeper model, e.g. model.hidden with more widths)"
        )
    if split == "layers":
        cuts = [len(blocks) * s // stages for s in range(1, stages)]
    else:
        cuts = _balanced([p for _, _, p in blocks], stages)
    return [0, *(blocks[c][0] for c in cuts), n]


def stage_module(model: nn.Sequential, bounds: list[int], stage: int) -> nn.Sequential:
    """Stage ``stage`` of ``model``, its children named by their index in the whole model."""
    lo, hi = bounds[stage], bounds[stage + 1]
    return nn.Sequential(OrderedDict((str(i), model[i]) for i in range(lo, hi)))


def param_offsets(model: nn.Sequential, bounds: list[int]) -> list[int]:
    """Index of each stage's first parameter in ``model.parameters()`` order (optimizer state keys)."""
    offsets, total = [], 0
    for s in range(len(bounds) - 1):
        offsets.append(total)
        total += sum(1 for i in range(bounds[s], bounds[s + 1]) for _ in model[i].parameters())
    return offsets + [total]
