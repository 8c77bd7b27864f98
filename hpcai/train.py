"""The training loop: strategy-agnostic, no MPI.

The strategy (e.g. :class:`hpcai.parallel.data_parallel.DataParallel`) is handed in and does all
communication: ``prepare(model)``, ``train_step(model, x, y, loss_fn)``, ``sum``, ``max``, ``gather``.
Checkpoints hold everything needed to continue bit for bit: model, optimizer and scheduler state, the position
(epoch, step within it), every rank's RNG states and the losses of the unfinished logging window.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from hpcai import checkpoint as ckpt
from hpcai.data.loader import BatchLoader, shard_range
from hpcai.data.shards import ShardedSplit
from hpcai.report import Reporter, elapsed, versions
from hpcai.spec import CheckpointSection, JobSpec, TrainSection

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpointed on request; run the same command again to continue


class Strategy(Protocol):
    """What the loop needs from a parallel strategy. A strategy may also define
    ``evaluate(model, split) -> float`` (e.g. a pipeline, where only the last stage sees logits), and
    ``state_for_checkpoint(model, optimizer, scheduler) -> Payload | None`` (collective: the whole model's
    state on rank 0) with ``load_from_checkpoint(payload, model, optimizer, scheduler)`` when each rank holds
    only part of the model; without them rank 0 packs its own (whole) model."""

    world_size: int
    is_root: bool

    def prepare(self, model: nn.Module) -> None: ...
    def train_step(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Any
    ) -> torch.Tensor | None:
        """Forward and backward of this rank's share of a global batch, gradients reduced and ready for the
        optimizer; the local mean loss, or None on ranks that compute no loss (early pipeline stages)."""
        ...

    def sum(self, values: np.ndarray) -> np.ndarray: ...
    def max(self, values: np.ndarray) -> np.ndarray: ...
    def gather(self, values: np.ndarray) -> np.ndarray | None: ...


class Preempted(Exception):
    """Training stopped on a signal after writing a checkpoint."""

    exit_code = EXIT_PREEMPTED


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


def total_steps(cfg: TrainSection, steps_per_epoch: int) -> int:
    return cfg.steps if cfg.steps > 0 else cfg.epochs * steps_per_epoch


@dataclass
class Result:
    steps: int
    epochs: float
    final_loss: float
    test_accuracy: float
    train_seconds: float
    samples_per_s: float
    data_wait_s: float
    resumed_from: int | None = None
    stopped_early: bool = False
    checkpoints: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class FailureInjection:
    """``--inject-failure step=K[,rank=R][,how=kill|hang|raise]``: rank R fails right after its K-th step.

    kill (default): SIGKILL, a crash. hang: the rank stops communicating (sleeps forever), like a stuck node
    or file system. raise: a Python exception, like a bad batch or a bug.
    """

    step: int
    rank: int = 0
    how: str = "kill"

    HOWS = ("kill", "hang", "raise")

    @classmethod
    def parse(cls, text: str) -> FailureInjection:
        from hpcai.errors import UserError

        try:
            kv = dict(item.split("=", 1) for item in text.split(","))
            unknown = set(kv) - {"step", "rank", "how"}
            if unknown or "step" not in kv:
                raise ValueError
            inj = cls(step=int(kv["step"]), rank=int(kv.get("rank", 0)), how=kv.get("how", "kill"))
        except ValueError:
            raise UserError(
                f"--inject-failure: expected step=K[,rank=R][,how=kill|hang|raise], got {text!r}"
            ) from None
        if inj.step < 1 or inj.rank < 0 or inj.how not in cls.HOWS:
            raise UserError(
                f"--inject-failure: step must be >= 1, rank >= 0, how one of {', '.join(cls.HOWS)}; "
                f"got {text!r}"
            )
        return inj

    def fire(self, logger: Any) -> None:
        """Fail as configured (called by the rank and step it names)."""
        logger.info(f"injected failure: {self.how} at step {self.step}")
        for h in logger.handlers:
            h.flush()
        if self.how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.how == "raise":
            raise RuntimeError(f"injected failure at step {self.step}")
        while True:  # hang: alive, silent, holding whatever it holds
            time.sleep(3600)


def evaluate(model: nn.Module, split: ShardedSplit, strategy: Strategy, rank: int, batch: int = 512) -> float:
    """Accuracy over the whole split: each rank scores a contiguous part, the counts are summed.

    Counted per target element: a label per sample, or a next token per position for a language model
    (logits (B, V, T), targets (B, T)).
    """
    part = shard_range(len(split), rank, strategy.world_size)
    correct = targets = 0
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for lo in range(part.start, part.stop, batch):
            x, y = split.read(np.arange(lo, min(part.stop, lo + batch)))
            pred = model(torch.from_numpy(x).to(device)).argmax(1).cpu()
            correct += int((pred == torch.from_numpy(y)).sum())
            targets += y.size
    model.train()
    counts = strategy.sum(np.array([correct, targets], dtype=np.int64))
    return float(counts[0]) / max(1, int(counts[1]))


class Trainer:
    """One run of the loop on one rank; resumable from a checkpoint payload."""

    def __init__(
        self,
        spec: JobSpec,
        model: nn.Module,
        strategy: Strategy,
        loader: BatchLoader,
        reporter: Reporter,
        rank: int,
        writer: ckpt.CheckpointWriter | None = None,
        stop: Any = None,
        inject: FailureInjection | None = None,
        on_eval: Any = None,
    ):
        self.spec, self.cfg = spec, spec.train
        self.ckpt_cfg: CheckpointSection = spec.checkpoint
        self.model, self.strategy, self.loader, self.reporter, self.rank = (
            model,
            strategy,
            loader,
            reporter,
            rank,
        )
        self.writer, self.stop, self.inject = writer, stop, inject
        # on_eval(epoch, test_accuracy) -> bool, called on every rank after each evaluation (eval_every);
        # True on any rank ends training there (early stopping, e.g. a sweep pruning a trial).
        self.on_eval = on_eval
        self.stopped_early = False
        self.device = next(model.parameters()).device
        strategy.prepare(model)  # rank 0's initial parameters everywhere
        self.optimizer = make_optimizer(model, self.cfg)
        self.n_steps = total_steps(self.cfg, loader.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.cfg, self.n_steps))
        self.step = self.epoch = self.step_in_epoch = 0
        self.window: list[torch.Tensor | None] = []  # this rank's losses since the last logged step
        self.carried: list[float] = []  # rank 0: (rank, step) losses of the window from before a restart
        self.last_loss = float("nan")  # rank 0: the loss of the last logged step (summary's final_loss)
        self.resumed_from: int | None = None
        self.checkpoints: list[dict[str, Any]] = []

    # -------------------------------------------------------------------------------- checkpoint state

    def restore(self, payload: ckpt.Payload) -> None:
        """Continue from ``payload`` with the bits of the run that wrote it (any rank count, same batch)."""
        # A strategy that splits the model (a pipeline) takes its part of the whole-model file itself.
        load = getattr(self.strategy, "load_from_checkpoint", None)
        if load is not None:
            load(payload, self.model, self.optimizer, self.scheduler)
        else:
            ckpt.unpack_state(payload, self.model, self.optimizer, self.scheduler)
        a = payload.attrs
        self.step, self.epoch, self.step_in_epoch = int(a["step"]), int(a["epoch"]), int(a["step_in_epoch"])
        saved_world = int(a["world_size"])
        # A rank beyond the writer's world size (elastic restart onto more ranks) takes rank 0's RNG stream.
        key = f"rng/rank_{self.rank}" if self.rank < saved_world else "rng/rank_0"
        ckpt.unpack_rng(payload.arrays[key])
        self.carried = list(payload.arrays.get("train/window_losses", np.zeros(0))) if self.rank == 0 else []
        self.last_loss = float(a.get("last_loss", float("nan")))
        self.resumed_from = self.step

    def save_checkpoint(self) -> None:
        """Collective: every rank hands rank 0 its RNG state and window losses; rank 0 commits the file."""
        rngs = self.strategy.gather(ckpt.pack_rng())
        window = self._gather_window()
        # A strategy holding part of the model on each rank gathers the whole model to rank 0 (collective).
        gather_state = getattr(self.strategy, "state_for_checkpoint", None)
        payload = gather_state(self.model, self.optimizer, self.scheduler) if gather_state else None
        if not self.strategy.is_root:
            return
        self.carried += window
        deferred: set[str] = set()
        if payload is None:
            payload = ckpt.pack_state(self.model, self.optimizer, self.scheduler)
            # Views of live tensors that only the optimizer step changes: the async writer copies them while
            # the next forward and backward run, and fit() fences before that step.
            deferred = ckpt.step_owned_keys(self.model, payload.arrays)
        for r, blob in enumerate(rngs):
            payload.arrays[f"rng/rank_{r}"] = blob
        payload.arrays["train/window_losses"] = np.asarray(self.carried, dtype=np.float64)
        epoch, in_epoch = self.epoch, self.step_in_epoch
        if in_epoch >= self.loader.steps_per_epoch:  # the epoch is done: resume at the next one's start
            epoch, in_epoch = epoch + 1, 0
        payload.attrs.update(
            step=self.step,
            epoch=epoch,
            step_in_epoch=in_epoch,
            samples_seen=self.step * self.loader.global_batch,
            last_loss=self.last_loss,
            world_size=self.strategy.world_size,
            shuffle_seed=self.cfg.seed,
            spec=_json(self.spec.to_dict()),
            spec_sha256=self.spec.spec_hash(),
            versions=_json(versions()),
        )
        path = self.writer.save(payload, deferred=deferred)
        self.checkpoints.append(
            {
                "step": self.step,
                "file": path.name,
                "block_s": self.writer.last_block_s,
                "async": self.writer.async_save,
            }
        )
        self.reporter.logger.info(f"checkpoint {path.name}: blocked {self.writer.last_block_s * 1e3:.1f} ms")

    def _evaluate(self, split: ShardedSplit) -> float:
        own = getattr(self.strategy, "evaluate", None)
        return (
            own(self.model, split)
            if own is not None
            else evaluate(self.model, split, self.strategy, self.rank)
        )

    def _gather_window(self) -> list[float]:
        """All ranks' window losses, on rank 0, as (rank, step) values; the local window is then empty.

        Each rank sends (value, valid) pairs of equal count; ranks without a loss send valid = 0.
        """
        local = np.array(
            [(float(v), 1.0) if v is not None else (0.0, 0.0) for v in self.window], dtype=np.float64
        ).reshape(-1, 2)
        self.window = []
        gathered = self.strategy.gather(local)
        if gathered is None:
            return []
        rows = np.asarray(gathered).reshape(-1, 2)
        return [float(v) for v, valid in rows if valid]

    # -------------------------------------------------------------------------------- the loop

    def fit(self, test: ShardedSplit) -> Result:
        if self.loader.steps_per_epoch == 0:
            raise ValueError(
                f"the training split has {len(self.loader.split)} samples, fewer than one global batch"
            )
        loss_fn = nn.CrossEntropyLoss()
        cfg, ccfg = self.cfg, self.ckpt_cfg
        t_start = time.perf_counter()
        last_ckpt = window_t0 = time.perf_counter()
        window_steps = 0
        start_step = self.step
        while self.step < self.n_steps:
            for x, y in self.loader.epoch(self.epoch, self.step_in_epoch):
                if self.device.type != "cpu":
                    x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                loss = self.strategy.train_step(self.model, x, y, loss_fn)
                lr = self.scheduler.get_last_lr()[0]
                if self.writer is not None and (waited := self.writer.fence()):
                    self.checkpoints[-1]["block_s"] += waited  # the snapshot's copy outlasted fwd + bwd
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                self.step_in_epoch += 1
                self.window.append(loss)
                if self.step == start_step + 1 and self.writer is not None and self.strategy.is_root:
                    # Optimizer state exists now: size the async writer's snapshot buffers, off the loop.
                    if getattr(self.strategy, "state_for_checkpoint", None) is None:
                        self.writer.reserve(
                            ckpt.pack_state(self.model, self.optimizer, self.scheduler).arrays
                        )
                window_steps += 1
                if self.inject and self.inject.step == self.step and self.inject.rank == self.rank:
                    self.inject.fire(self.reporter.logger)
                epoch_end = self.step_in_epoch == self.loader.steps_per_epoch
                do_eval = bool(cfg.eval_every) and epoch_end and (self.epoch + 1) % cfg.eval_every == 0
                if self.step % cfg.log_every == 0 or self.step == self.n_steps or do_eval:
                    values = self.carried + self._gather_window()
                    self.carried = []
                    if self.strategy.is_root:
                        # fsum: exactly rounded whatever the order, so a resumed window logs the same bits.
                        self.last_loss = math.fsum(values) / len(values)
                    dt = time.perf_counter() - window_t0
                    record = {
                        "step": self.step,
                        "epoch": self.epoch,
                        "loss": self.last_loss,
                        "lr": lr,
                        "samples_per_s": window_steps * self.loader.global_batch / dt,
                        "wall_s": elapsed(self.reporter.t0),
                    }
                    if do_eval:  # counts in the training time, as MLPerf's time-to-train does
                        record["test_accuracy"] = self._evaluate(test)
                    self.reporter.step(record, advance=window_steps)
                    window_steps, window_t0 = 0, time.perf_counter()
                    if do_eval and self.on_eval is not None:
                        verdict = bool(self.on_eval(self.epoch, record["test_accuracy"]))
                        if self.strategy.max(np.array([verdict], dtype=np.int32))[0]:
                            self.stopped_early = True
                            break
                if self.step >= self.n_steps:
                    break
                # One tiny collective a step: all ranks agree on a stop request or a timed checkpoint.
                now = time.perf_counter()
                timed = ccfg.every_seconds > 0 and now - last_ckpt >= ccfg.every_seconds
                stop_flag = bool(self.stop is not None and self.stop.is_set())
                stop_any, timed_any = self.strategy.max(np.array([stop_flag, timed], dtype=np.int32))
                by_steps = ccfg.every_steps > 0 and self.step % ccfg.every_steps == 0
                if self.writer is not None and (by_steps or timed_any or stop_any):
                    self.save_checkpoint()
                    last_ckpt = time.perf_counter()
                if stop_any:
                    if self.writer is not None:
                        self.writer.wait()
                    raise Preempted(f"stopped on a signal at step {self.step}; checkpoint written")
            else:  # the epoch ran out (not a break): on to the next one
                self.epoch += 1
                self.step_in_epoch = 0
                continue
            if self.stopped_early:
                break
        train_s = time.perf_counter() - t_start
        if (
            self.writer is not None
            and ccfg.final
            and (not self.checkpoints or self.checkpoints[-1]["step"] != self.step)
        ):
            self.save_checkpoint()
        if self.writer is not None:
            self.writer.wait()
            for c in self.checkpoints:  # what the async writer thread took from training's cores
                if c["file"] in self.writer.thread_cpu_s:
                    c["writer_cpu_s"] = self.writer.thread_cpu_s[c["file"]]
        accuracy = self._evaluate(test)
        done = self.step - start_step
        return Result(
            steps=self.step,
            epochs=self.step / self.loader.steps_per_epoch,
            final_loss=self.last_loss,
            test_accuracy=accuracy,
            train_seconds=train_s,
            samples_per_s=done * self.loader.global_batch / train_s if done else 0.0,
            data_wait_s=self.loader.wait_s,
            resumed_from=self.resumed_from,
            stopped_early=self.stopped_early,
            checkpoints=self.checkpoints,
        )


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, sort_keys=True)
