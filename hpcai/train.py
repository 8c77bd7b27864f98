"""The training loop: strategy-agnostic, no MPI.

The strategy (e.g. :class:`hpcai.parallel.data_parallel.DataParallel`) is handed in and does all
communication: ``prepare(model)``, ``train_step(model, x, y, loss_fn)``, ``sum``, ``max``, ``gather``.
Checkpoints hold everything needed to continue bit for bit: model, optimizer and scheduler state, the position
(epoch, step within it), every rank's RNG states and the losses of the unfinished logging window.

Divergence (``train.on_nonfinite``): every step, before the update, the ranks agree through one tiny
collective whether any rank saw a NaN/inf loss or gradient norm (the pipeline's loss lives on its last stage,
each stage has its own gradients). "stop" raises :class:`NonFiniteError` on every rank at that step, before
the update and without writing a checkpoint; "skip" drops the step's update on every rank as AMP's
GradScaler does: no optimizer step (its state untouched), the model's buffers put back, while the batch, the
step counter and the learning-rate schedule move on. Unlike AMP's scaler, nothing changes after a skipped
step, so a state that makes every step non-finite would skip to the end: :data:`MAX_SKIPS_IN_ROW` skipped
steps in a row, or non-finite parameters, stop the job as "stop" does. A checkpoint is never written of
non-finite parameters.
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
EXIT_NONFINITE = 4  # training diverged (train.on_nonfinite = "stop"); 3 is the stall abort's
# "skip": this many non-finite steps in a row mean the state itself diverged (a bad batch is not followed by
# nine more in a shuffled epoch): the job stops instead of skipping every step to the end.
MAX_SKIPS_IN_ROW = 10


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


class NonFiniteError(Exception):
    """Training diverged: a NaN/inf loss or gradient norm under ``train.on_nonfinite = "stop"``, or
    non-finite parameters (which skipping cannot repair). No checkpoint of that state is written.

    The message is the one line to print (rank 0's names the step, the rank and the last good checkpoint).
    ``collective``: every rank of the job raises it at the same step (they agreed through a collective), so
    rank 0 prints it and every rank exits with :attr:`exit_code`, as for :class:`Preempted`; False when one
    rank raises it alone (a parameter server), which must end the job with MPI_Abort(exit_code).
    """

    exit_code = EXIT_NONFINITE

    def __init__(self, message: str, collective: bool = True):
        super().__init__(message)
        self.collective = collective


# What a rank saw, in a step's flag: (world - rank) * 8 + kind, so that the maximum over the ranks names the
# lowest rank that saw one and what it saw.
NONFINITE_KINDS = {
    1: "loss is nan",
    2: "loss is inf",
    3: "gradient norm is nan",
    4: "gradient norm is inf",
    5: "parameters are not finite",
}


def nonfinite_kind(loss: float | None, grad_norm: float) -> int:
    """The :data:`NONFINITE_KINDS` key for a rank's loss (None: this rank computes none) and gradient norm;
    0 when both are finite."""
    if loss is not None and not math.isfinite(loss):
        return 1 if math.isnan(loss) else 2
    if not math.isfinite(grad_norm):
        return 3 if math.isnan(grad_norm) else 4
    return 0


def encode_nonfinite(kind: int, rank: int, world: int) -> int:
    return (world - rank) * 8 + kind if kind else 0


def decode_nonfinite(code: int, world: int) -> str:
    """The text "<what> on rank <r>" of the maximum of the ranks' :func:`encode_nonfinite` values."""
    return f"{NONFINITE_KINDS[code % 8]} on rank {world - code // 8}"


def total_norm(tensors: list[torch.Tensor]) -> float:
    """The 2-norm of all ``tensors`` together (NaN/inf when any element is)."""
    if not tensors:
        return 0.0
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if get_total_norm is not None:
        return float(get_total_norm(tensors))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors])))


def grad_norm(model: nn.Module) -> float:
    return total_norm([p.grad.detach() for p in model.parameters() if p.grad is not None])


def params_finite(model: nn.Module) -> bool:
    return math.isfinite(total_norm([p.detach() for p in model.parameters() if p.is_floating_point()]))


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
    skipped_steps: int = 0  # steps whose update train.on_nonfinite = "skip" dropped (resumed runs included)


@dataclass(frozen=True)
class FailureInjection:
    """``--inject-failure step=K[,rank=R][,how=kill|hang|raise|nan]``: rank R fails in its K-th step, right
    after its forward and backward (before the step's flag exchange and update: the others wait for it there).

    kill (default): SIGKILL, a crash. hang: the rank stops communicating (sleeps forever), like a stuck node
    or file system. raise: a Python exception, like a bad batch or a bug. nan: rank R's loss (where it has
    one) and gradients of step K become NaN before the update, as a diverging step's would
    (train.on_nonfinite).
    """

    step: int
    rank: int = 0
    how: str = "kill"

    HOWS = ("kill", "hang", "raise", "nan")

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
                f"--inject-failure: expected step=K[,rank=R][,how={'|'.join(cls.HOWS)}], got {text!r}"
            ) from None
        if inj.step < 1 or inj.rank < 0 or inj.how not in cls.HOWS:
            raise UserError(
                f"--inject-failure: step must be >= 1, rank >= 0, how one of {', '.join(cls.HOWS)}; "
                f"got {text!r}"
            )
        return inj

    def poisons(self, step: int, rank: int) -> bool:
        """Whether this rank's gradients of ``step`` (1-based) are to be made NaN (how = nan)."""
        return self.how == "nan" and self.step == step and self.rank == rank

    def poison(
        self, loss: torch.Tensor | None, grads: list[torch.Tensor], logger: Any
    ) -> torch.Tensor | None:
        """how = nan: the loss (if any) and the gradients become NaN; returns the loss."""
        logger.info(f"injected failure: nan at step {self.step}")
        with torch.no_grad():
            for g in grads:
                g.fill_(float("nan"))
        return None if loss is None else loss * float("nan")

    def fire(self, logger: Any) -> None:
        """Fail as configured (called by the rank and step it names); nan is applied by :meth:`poison`."""
        if self.how == "nan":
            return
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
        self.skipped_steps = 0  # train.on_nonfinite = "skip": updates dropped, this run and those it resumes
        self._warned_skip = False  # a skip was announced in the current logging window
        self._skips_in_row = 0
        # "skip" puts the buffers (BatchNorm's running statistics) back as they were before a dropped step.
        self._buffers = list(model.buffers()) if self.cfg.on_nonfinite == "skip" else []
        self._buffers_before = [b.detach().clone() for b in self._buffers]

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
        self.skipped_steps = int(a.get("skipped_steps", 0))
        self.resumed_from = self.step

    def save_checkpoint(self) -> None:
        """Collective: every rank hands rank 0 its RNG state and window losses; rank 0 commits the file.

        Never of non-finite parameters (an update with finite gradients can still overflow them): every rank
        checks its own (a pipeline stage holds only its part) and all raise :class:`NonFiniteError` together.
        """
        bad = encode_nonfinite(0 if params_finite(self.model) else 5, self.rank, self.strategy.world_size)
        bad = int(self.strategy.max(np.array([bad], dtype=np.int32))[0])
        if bad:
            raise self._stop(
                f"step {self.step}: {decode_nonfinite(bad, self.strategy.world_size)} after its update"
            )
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
            skipped_steps=self.skipped_steps,
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

    # -------------------------------------------------------------------------------- non-finite steps

    def _nonfinite_code(self, loss: torch.Tensor | None) -> int:
        """This rank's flag for the step just computed (0: loss and gradient norm finite)."""
        kind = nonfinite_kind(None if loss is None else float(loss), grad_norm(self.model))
        return encode_nonfinite(kind, self.rank, self.strategy.world_size)

    def _stop(self, what: str) -> NonFiniteError:
        """The error every rank raises (rank 0's line is printed); an async checkpoint still being written is
        of an earlier, good state: it is finished first."""
        if self.writer is not None:
            self.writer.wait()
        last = ""
        if self.writer is not None and self.strategy.is_root:
            found = ckpt.list_checkpoints(self.writer.run_dir)
            last = f" (last good: {found[-1]})" if found else " (none was written before it)"
        return NonFiniteError(
            f"{what} (train.lr = {self.cfg.lr:g}, {self.scheduler.get_last_lr()[0]:.3g} at this step; "
            f"train.on_nonfinite = '{self.cfg.on_nonfinite}'); stopped, no checkpoint written of this "
            f"state{last}"
        )

    def _on_nonfinite(self, code: int) -> None:
        """Every rank, the same ``code`` (the step's agreed flag): raise under "stop"; under "skip" count the
        step, put the buffers back and announce it (once per logging window); the caller drops the update."""
        world = self.strategy.world_size
        what = f"step {self.step + 1}: {decode_nonfinite(code, world)}"
        if self.cfg.on_nonfinite == "stop":
            raise self._stop(what)
        # Non-finite parameters give a non-finite loss at every later step: skipping cannot get past them.
        bad = encode_nonfinite(0 if params_finite(self.model) else 5, self.rank, world)
        bad = int(self.strategy.max(np.array([bad], dtype=np.int32))[0])
        if bad:
            raise self._stop(f"{what}, and the {decode_nonfinite(bad, world)}: skipping steps cannot recover")
        self._skips_in_row += 1
        if self._skips_in_row >= MAX_SKIPS_IN_ROW:
            raise self._stop(f"{what}, {self._skips_in_row} steps in a row: skipping steps cannot recover")
        self.skipped_steps += 1
        with torch.no_grad():
            for b, before in zip(self._buffers, self._buffers_before, strict=True):
                b.copy_(before)
        if not self._warned_skip:
            self._warned_skip = True
            self.reporter.say(
                f"warning: {what}: update dropped on every rank (train.on_nonfinite = 'skip'); "
                f"{self.skipped_steps} step(s) skipped so far"
            )

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
                with torch.no_grad():
                    for b, before in zip(self._buffers, self._buffers_before, strict=True):
                        before.copy_(b)
                loss = self.strategy.train_step(self.model, x, y, loss_fn)
                if self.inject and self.inject.step == self.step + 1 and self.inject.rank == self.rank:
                    if self.inject.poisons(self.step + 1, self.rank):
                        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
                        loss = self.inject.poison(loss, grads, self.reporter.logger)
                    self.inject.fire(self.reporter.logger)  # kill, hang, raise: before the step's flags
                lr = self.scheduler.get_last_lr()[0]
                # One tiny collective a step, before the update: all ranks agree on a non-finite loss or
                # gradient norm on any rank, a stop request and a timed checkpoint.
                timed = ccfg.every_seconds > 0 and time.perf_counter() - last_ckpt >= ccfg.every_seconds
                stop_flag = bool(self.stop is not None and self.stop.is_set())
                flags = np.array([self._nonfinite_code(loss), stop_flag, timed], dtype=np.int32)
                bad, stop_any, timed_any = (int(v) for v in self.strategy.max(flags))
                if bad:
                    self._on_nonfinite(bad)  # "stop" raises here, on every rank
                if self.writer is not None and (waited := self.writer.fence()):
                    self.checkpoints[-1]["block_s"] += waited  # the snapshot's copy outlasted fwd + bwd
                if not bad:
                    self.optimizer.step()
                    self._skips_in_row = 0
                self.scheduler.step()  # a skipped step still moves the schedule on, as with AMP's scaler
                self.step += 1
                self.step_in_epoch += 1
                self.window.append(None if bad else loss)  # a dropped step's loss is not logged
                if self.step == start_step + 1 and self.writer is not None and self.strategy.is_root:
                    # Optimizer state exists now: size the async writer's snapshot buffers, off the loop.
                    if getattr(self.strategy, "state_for_checkpoint", None) is None:
                        self.writer.reserve(
                            ckpt.pack_state(self.model, self.optimizer, self.scheduler).arrays
                        )
                window_steps += 1
                epoch_end = self.step_in_epoch == self.loader.steps_per_epoch
                do_eval = bool(cfg.eval_every) and epoch_end and (self.epoch + 1) % cfg.eval_every == 0
                if self.step % cfg.log_every == 0 or self.step == self.n_steps or do_eval:
                    values = self.carried + self._gather_window()
                    self.carried = []
                    if self.strategy.is_root:
                        # fsum: exactly rounded whatever the order, so a resumed window logs the same bits.
                        # NaN: every step of the window was skipped (train.on_nonfinite = "skip").
                        self.last_loss = math.fsum(values) / len(values) if values else float("nan")
                    dt = time.perf_counter() - window_t0
                    record = {
                        "step": self.step,
                        "epoch": self.epoch,
                        "loss": self.last_loss,
                        "lr": lr,
                        "samples_per_s": window_steps * self.loader.global_batch / dt,
                        "wall_s": elapsed(self.reporter.t0),
                    }
                    if cfg.on_nonfinite == "skip":
                        record["skipped_steps"] = self.skipped_steps
                    self._warned_skip = False
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
            skipped_steps=self.skipped_steps,
        )


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, sort_keys=True)
