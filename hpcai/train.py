"""The training loop: strategy-agnostic, no MPI.

The strategy (e.g. :class:`hpcai.parallel.data_parallel.DataParallel`) is handed in and does all
communication:
``prepare(model)``, ``zero_grad()``, ``reduce_gradients()``, ``sum(array)``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from hpcai.data.loader import BatchLoader, shard_range
from hpcai.data.shards import ShardedSplit
from hpcai.report import Reporter, elapsed
from hpcai.spec import TrainSection


class Strategy(Protocol):
    world_size: int
    is_root: bool

    def prepare(self, model: nn.Module) -> None: ...
    def zero_grad(self) -> None: ...
    def reduce_gradients(self) -> None: ...
    def sum(self, values: np.ndarray) -> np.ndarray: ...


def make_optimizer(model: nn.Module, cfg: TrainSection) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_lambda(cfg: TrainSection, total_steps: int):
    """Multiplier of the peak lr at a step: linear warm-up, then constant or cosine to 0."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            span = max(1, total_steps - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
        return 1.0

    return f


@dataclass
class Result:
    steps: int
    epochs: float
    final_loss: float
    test_accuracy: float
    train_seconds: float
    samples_per_s: float
    data_wait_s: float


def evaluate(model: nn.Module, split: ShardedSplit, strategy: Strategy, rank: int, batch: int = 512) -> float:
    """Accuracy over the whole split: each rank scores a contiguous part, the counts are summed."""
    part = shard_range(len(split), rank, strategy.world_size)
    correct = 0
    model.eval()
    with torch.no_grad():
        for lo in range(part.start, part.stop, batch):
            x, y = split.read(np.arange(lo, min(part.stop, lo + batch)))
            correct += int((model(torch.from_numpy(x)).argmax(1) == torch.from_numpy(y)).sum())
    model.train()
    counts = strategy.sum(np.array([correct, part.stop - part.start], dtype=np.int64))
    return float(counts[0]) / max(1, int(counts[1]))


def total_steps(cfg: TrainSection, steps_per_epoch: int) -> int:
    return cfg.steps if cfg.steps > 0 else cfg.epochs * steps_per_epoch


def fit(
    model: nn.Module,
    strategy: Strategy,
    loader: BatchLoader,
    test: ShardedSplit,
    cfg: TrainSection,
    reporter: Reporter,
    rank: int,
) -> Result:
    """Train to ``cfg.steps`` (or ``cfg.epochs``) optimizer steps, then evaluate on ``test``."""
    if loader.steps_per_epoch == 0:
        raise ValueError(f"the training split has {len(loader.split)} samples, fewer than one global batch")
    strategy.prepare(model)
    optimizer = make_optimizer(model, cfg)
    n_steps = total_steps(cfg, loader.steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, n_steps))
    loss_fn = nn.CrossEntropyLoss()
    step, epoch = 0, 0
    window_loss = torch.zeros(())  # summed locally between logged steps: no sync on the other steps
    window_n, window_t0 = 0, time.perf_counter()
    t_start = time.perf_counter()
    final_loss = float("nan")
    while step < n_steps:
        for x, y in loader.epoch(epoch):
            strategy.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            strategy.reduce_gradients()
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            step += 1
            window_loss += loss.detach()
            window_n += 1
            if step % cfg.log_every == 0 or step == n_steps:
                # The one sync point of a logged step: the mean loss over ranks and window.
                total = strategy.sum(np.array([float(window_loss), window_n], dtype=np.float64))
                dt = time.perf_counter() - window_t0
                final_loss = total[0] / total[1]
                reporter.step(
                    {
                        "step": step,
                        "epoch": epoch,
                        "loss": final_loss,
                        "lr": lr,
                        "samples_per_s": window_n * loader.global_batch / dt,
                        "wall_s": elapsed(reporter.t0),
                    },
                    advance=window_n,
                )
                window_loss.zero_()
                window_n, window_t0 = 0, time.perf_counter()
            if step >= n_steps:
                break
        epoch += 1
    train_s = time.perf_counter() - t_start
    accuracy = evaluate(model, test, strategy, rank)
    return Result(
        steps=step,
        epochs=step / loader.steps_per_epoch,
        final_loss=final_loss,
        test_accuracy=accuracy,
        train_seconds=train_s,
        samples_per_s=step * loader.global_batch / train_s,
        data_wait_s=loader.wait_s,
    )
