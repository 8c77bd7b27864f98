"""The server and worker loops of parameter-server training (no raw MPI: that is :mod:`ps_comm`).

A worker's life: PULL (header only) to every server -> replies with each shard -> loop { gradient of its
batch -> PUSH (header + gradient shard) to every server -> replies (new parameters, or stop) } -> DONE.
A push and the next pull are one round trip: the reply to a push carries the parameters for the next step.

A server's loop, per worker ``w`` (all numbers per server; every server sees every push, so they agree):

- ``clock[w]``: pushes applied from ``w`` = the step ``w`` computes next.
- async: apply each push at once as its own optimizer step (ps.update_rule "matched": W pushes move the
         parameters as one data-parallel step; ps.stale_scaling damps pushes older than W - 1 updates), reply.
- ssp:   apply at once, but hold the reply while ``clock[w] - min(clock of live workers) > staleness``.
- bsp:   hold every reply until all live workers pushed this step; apply their mean (summed in worker order:
         reproducible bits) as one update, reply to all.

Recorded per applied update: *staleness* = the worker's step minus the slowest live worker's step when it
read the parameters (what ssp bounds, 0 in bsp, unbounded in async), and *delay* = updates applied to the
shard between that read and this update (the classic asynchronous-SGD staleness).

Failures: a worker that sent nothing for ``ps.timeout_s`` after its last reply is declared failed (a hang);
one that raised tells the servers and leaves (LEAVE, then MPI_Finalize and exit 0, which MPICH's hydra
accepts). Either way the servers drop it from the gates and go on, or server 0 stops the job
(``ps.on_worker_failure``). While a server holds a reply back it sends heartbeats, so a waiting worker can
tell a slow peer from a dead server (no reply and no heartbeat for ``ps.timeout_s``: the job stops).

Divergence (``train.on_nonfinite``): a worker whose loss or gradient norm is NaN/inf does not push them; it
sends NONFINITE instead (header only). Under "skip" the servers count that worker step as done (its clock and
the version move on, as a data-parallel step's counter and schedule do) but apply nothing: the step is
dropped. Under "stop" (or when the worker's pulled parameters themselves are not finite) every server starts
*stopping*: pushes still arriving are applied as usual, so all servers keep the same versions and meet at the
same checkpoint collectives, which then write nothing; every reply says STOP_NONFINITE, and once every
worker has said goodbye every rank raises :class:`hpcai.train.NonFiniteError` (exit 4; server 0's message
names the worker and its step).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from hpcai.parallel import ps_comm
from hpcai.parallel.ps_comm import TAG_PUSH, TAG_REPLY, Message

OP_PULL, OP_PUSH, OP_DONE, OP_LEAVE, OP_NONFINITE = 1, 2, 3, 4, 5
STOP_BUDGET, STOP_NONFINITE = 1, 2  # a reply's stop word: the budget is spent / a step was not finite


def push_scale(cfg, workers: int, delay: int) -> float:
    """Gradient scale of one async/ssp push computed ``delay`` updates ago (ps.update_rule, ps.stale_scaling):
    W workers in lockstep give delays of W - 1, so only older pushes are damped, by (W - 1) / delay."""
    scale = 1.0 if cfg.update_rule == "matched" else 1.0 / workers
    if cfg.stale_scaling:
        scale *= min(1.0, max(1, workers - 1) / max(1, delay))
    return scale


def _f2i(x: float) -> int:
    return int(np.array([x], np.float64).view(np.int64)[0])


def _i2f(i: int) -> float:
    return float(np.array([i], np.int64).view(np.float64)[0])


@dataclass
class SlowDown:
    """``--slow-rank RANK:FACTOR`` (env HPCAI_SLOW_RANK): this worker sleeps (FACTOR - 1) x its step time."""

    factor: float = 1.0

    @classmethod
    def from_env(cls, rank: int) -> SlowDown:
        text = os.environ.get("HPCAI_SLOW_RANK", "")
        if text:
            r, _, f = text.partition(":")
            if int(r) == rank:
                return cls(float(f))
        return cls()

    def after(self, compute_s: float) -> None:
        if self.factor > 1:
            time.sleep((self.factor - 1) * compute_s)


# ------------------------------------------------------------------------------------ server


@dataclass
class Slot:
    """A server's view of one worker."""

    rank: int
    push: Message
    reply: Message
    recv: object = None  # the pre-posted receive of its next message
    sent: object = None  # the reply in flight
    state: str = "new"  # computing (replied, awaiting its push) | held | done | failed | left
    clock: int = 0
    since: float = 0.0  # when we last replied (computing) or last sent a heartbeat (held)
    read_version: int = 0
    read_min_clock: int = 0
    has_grad: bool = False  # bsp: its push for this round is in `push`
    skipped: bool = False  # bsp: its step of this round was not finite and is dropped ("skip")
    skips_in_row: int = 0  # its non-finite steps since its last pushed one
    updates: int = 0


@dataclass
class ServerResult:
    updates: int
    train_s: float
    updates_per_worker: dict[int, int]
    staleness: dict[int, int]
    delay: dict[int, int]
    failed: list[int]
    left: list[int]
    checkpoints: list[dict] = field(default_factory=list)


class Server:
    """One server's loop over its shard; server 0 also logs metrics and commits checkpoints (via ``save``)."""

    def __init__(self, topo, plan, opt, spec, n_steps, reporter, logger, inject, save, steps_per_epoch):
        self.topo, self.plan, self.opt, self.spec, self.cfg = topo, plan, opt, spec, spec.ps
        self.reporter, self.logger, self.inject, self.save = reporter, logger, inject, save
        self.steps_per_epoch, self.n_steps = steps_per_epoch, n_steps
        self.mode, self.W0 = spec.ps.mode, topo.n_workers
        n = plan.shard_sizes[topo.rank]
        self.slots = {r: Slot(r, Message(n), Message(n)) for r in topo.worker_ranks}
        # version: optimizer steps applied to this shard (async/ssp: one per push; bsp: one per round).
        self.version = 0
        self.budget = n_steps * (1 if self.mode == "bsp" else self.W0)
        self.finished = False
        self.staleness: dict[int, int] = {}
        self.delay: dict[int, int] = {}
        self.window: list[float] = []
        self.last_loss = float("nan")
        self.last_logged = -1
        self.checkpoints: list[dict] = []
        self.resumed_from: int | None = None
        self.local_batch = spec.train.batch_size // self.W0
        self.on_nonfinite = spec.train.on_nonfinite
        self.skipped = 0  # worker steps dropped as not finite ("skip"), resumed runs included
        self.stopping: str | None = None  # why the job stops (a non-finite step): no more checkpoints
        self._warned_skip = False  # a skip was announced in the current logging window

    # ---------------------------------------------------------------- state in checkpoints

    @property
    def global_step(self) -> int:
        return self.version if self.mode == "bsp" else self.version // self.W0

    def state_attrs(self) -> dict:
        return {
            "ps_version": self.version,
            "ps_mode": self.mode,
            "ps_workers": self.W0,
            "skipped_steps": self.skipped,
        }

    def state_arrays(self) -> dict[str, np.ndarray]:
        def pairs(h):
            return np.array(sorted(h.items()), dtype=np.int64).reshape(-1, 2)

        return {
            "ps/worker_clocks": np.array([s.clock for s in self.slots.values()], np.int64),
            "ps/updates_per_worker": np.array([s.updates for s in self.slots.values()], np.int64),
            "ps/staleness_hist": pairs(self.staleness),
            "ps/delay_hist": pairs(self.delay),
        }

    def restore(self, payload) -> None:
        a = payload.attrs
        same = int(a.get("ps_workers", -1)) == self.W0 and a.get("ps_mode") == self.mode
        self.version = int(a["ps_version"]) if same else payload.step * (1 if self.mode == "bsp" else self.W0)
        clocks = payload.arrays.get("ps/worker_clocks")
        for i, s in enumerate(self.slots.values()):
            # Another worker count: every worker resumes at the global step (its share of that batch).
            s.clock = int(clocks[i]) if same and clocks is not None else payload.step
            s.updates = int(payload.arrays["ps/updates_per_worker"][i]) if same else 0
        if same:
            self.staleness = {int(k): int(v) for k, v in payload.arrays.get("ps/staleness_hist", [])}
            self.delay = {int(k): int(v) for k, v in payload.arrays.get("ps/delay_hist", [])}
        self.last_loss = float(a.get("last_loss", float("nan")))
        self.skipped = int(a.get("skipped_steps", 0))
        self.resumed_from = self.last_logged = payload.step
        self.finished = self.version >= self.budget

    # ---------------------------------------------------------------- the loop

    def run(self) -> ServerResult:
        comm = self.topo.ps_comm
        for s in self.slots.values():
            s.recv = ps_comm.post_recv(s.push, comm, s.rank, TAG_PUSH)
        t_start = self.t_window = time.perf_counter()
        self.updates_window = 0
        self.t_start = t_start
        while any(s.state not in ("done", "failed", "left") for s in self.slots.values()):
            live = [s for s in self.slots.values() if s.recv is not None]
            for i in ps_comm.completed([s.recv for s in live]):
                self._handle(live[i])
            self._release()
            self._deadlines()
            self._heartbeats()
            time.sleep(ps_comm.POLL_S)
        train_s = time.perf_counter() - t_start
        if self.topo.is_root and self.last_logged != self.global_step:
            self._log()
        for s in self.slots.values():  # our last replies to workers that said goodbye: received by now
            if s.sent is not None and s.state in ("done", "left"):
                s.sent.Wait()
        return ServerResult(
            updates=sum(s.updates for s in self.slots.values()),
            train_s=train_s,
            updates_per_worker={s.rank: s.updates for s in self.slots.values()},
            staleness=self.staleness,
            delay=self.delay,
            failed=[s.rank for s in self.slots.values() if s.state == "failed"],
            left=[s.rank for s in self.slots.values() if s.state == "left"],
        )

    def _alive(self) -> list[Slot]:
        return [s for s in self.slots.values() if s.state in ("new", "computing", "held")]

    def _min_clock(self) -> int:
        return min((s.clock for s in self._alive()), default=0)

    def _handle(self, s: Slot) -> None:
        s.recv = None  # completed; reposted when we reply
        op, clock, info, loss_bits = (int(v) for v in s.push.header)
        if op == OP_DONE:
            s.state = "done"
            return
        if op == OP_LEAVE:
            s.state = "left"
            self._failure(s, f"raised an error after its step {s.clock} and left (see its log)")
            return
        s.state, s.since = "held", time.monotonic()
        if op == OP_PULL or self.finished:
            return
        if op == OP_NONFINITE:
            self._nonfinite(s, info)
            return
        self.window.append(_i2f(loss_bits))
        s.skips_in_row = 0
        lag = s.clock - s.read_min_clock
        self.staleness[lag] = self.staleness.get(lag, 0) + 1
        s.clock += 1
        s.updates += 1
        self.updates_window += 1
        if self.mode == "bsp":
            s.has_grad = True  # applied with the others' when the round is complete (_release)
            self.delay[0] = self.delay.get(0, 0) + 1
            return
        gap = self.version - s.read_version
        self.delay[gap] = self.delay.get(gap, 0) + 1
        self.opt.apply(s.push.body, push_scale(self.cfg, self.W0, gap), self.global_step)
        self._advance()

    def _nonfinite(self, s: Slot, kind: int) -> None:
        """Worker ``s`` did not push: its step's loss or gradient (``kind``, train.NONFINITE_KINDS) is not
        finite. "skip": the step counts, nothing is applied; "stop", parameters that are themselves not finite
        or MAX_SKIPS_IN_ROW of this worker's steps in a row (no later step would be finite): the job stops."""
        from hpcai.train import MAX_SKIPS_IN_ROW, NONFINITE_KINDS

        what = f"step {s.clock + 1} of worker rank {s.rank}: {NONFINITE_KINDS.get(kind, 'not finite')}"
        s.skips_in_row += 1
        if self.on_nonfinite == "stop" or kind == 5 or s.skips_in_row >= MAX_SKIPS_IN_ROW:
            if self.on_nonfinite == "skip":
                what += f", {s.skips_in_row} of its steps in a row" if kind != 5 else ""
                what += ": skipping steps cannot recover"
            self.stop_for(what)
            return
        s.clock += 1
        self.skipped += 1
        if not self._warned_skip:
            self._warned_skip = True
            self.reporter.say(
                f"warning: {what}: update dropped (train.on_nonfinite = 'skip'); {self.skipped} worker "
                "step(s) skipped so far"
            )
        if self.mode == "bsp":
            s.skipped = True  # the round goes on without it (_release)
            return
        self._advance()

    def stop_for(self, what: str) -> None:
        """Start stopping the job for a non-finite step (kept: the first reason)."""
        if self.stopping is None:
            self.stopping = what
            self.logger.warning(f"stopping: {what}")

    def _advance(self) -> None:
        """After an update: log, checkpoint, inject, stop at the budget."""
        self.version += 1
        step_done = self.mode == "bsp" or self.version % self.W0 == 0
        if not step_done:
            if self.version >= self.budget:
                self.finished = True
            return
        step = self.global_step
        if self.topo.is_root and (step % self.spec.train.log_every == 0 or step >= self.n_steps):
            self._log()
        every = self.spec.checkpoint.every_steps
        if every and step % every == 0 and step < self.n_steps:
            self.save(self)
        if self.inject is not None and self.inject.step == step:
            self.inject.fire(self.logger)
        if self.version >= self.budget:
            self.finished = True

    def _log(self) -> None:
        step = self.global_step
        if self.window:
            self.last_loss = sum(self.window) / len(self.window)
        now = time.perf_counter()
        record: dict = {
            "step": step,
            "epoch": step // self.steps_per_epoch,
            "loss": self.last_loss,
            "lr": self.opt.lr(max(0, step - 1)),
            "samples_per_s": self.updates_window * self.local_batch / max(now - self.t_window, 1e-9),
            "wall_s": time.time() - self.reporter.t0,
            "train_s": now - self.t_start,
            "updates": sum(s.updates for s in self.slots.values()),
            "max_staleness": max(self.staleness, default=0),
        }
        if self.on_nonfinite == "skip":
            record["skipped_steps"] = self.skipped
        self._warned_skip = False
        self.reporter.step(record, advance=step - max(self.last_logged, 0))
        self.window, self.updates_window, self.t_window, self.last_logged = [], 0, now, step

    def _release(self) -> None:
        """Reply to held workers whose gate is open (all of them once the budget is spent)."""
        held = [s for s in self.slots.values() if s.state == "held"]
        if not held:
            return
        if self.mode == "bsp" and not self.finished:
            if any(s.state in ("new", "computing") for s in self.slots.values()):
                return  # the round is not complete
            grads = [s for s in self.slots.values() if s.has_grad]  # worker order: reproducible sums
            skips = [s for s in self.slots.values() if s.skipped]
            if grads or skips:  # a round of dropped steps only still counts (the schedule moves on)
                if grads:
                    total = grads[0].push.body.copy()
                    for s in grads[1:]:
                        total += s.push.body
                    self.opt.apply(total, 1.0 / len(grads), self.global_step)
                for s in grads + skips:
                    s.has_grad = s.skipped = False
                self._advance()
        low = self._min_clock()
        stop = STOP_NONFINITE if self.stopping else (STOP_BUDGET if self.finished else 0)
        for s in held:
            if stop or self.mode != "ssp" or s.clock - low <= self.cfg.staleness:
                self._reply(s, stop=stop, min_clock=low)

    def _reply(self, s: Slot, stop: int, min_clock: int) -> None:
        if s.sent is not None:
            s.sent.Wait()  # it pushed again, so it received our last reply: complete (or completing) now
        s.reply.header[:] = (self.version, stop, s.clock, min_clock)
        s.reply.body[:] = self.opt.values()
        comm = self.topo.ps_comm
        s.recv = ps_comm.post_recv(s.push, comm, s.rank, TAG_PUSH)  # before the reply: its next push
        s.sent = ps_comm.isend(s.reply, comm, s.rank, TAG_REPLY)
        s.state, s.since = "computing", time.monotonic()
        s.read_version, s.read_min_clock = self.version, min_clock

    def _deadlines(self) -> None:
        now = time.monotonic()
        for s in self.slots.values():
            if s.state == "computing" and now - s.since > self.cfg.timeout_s:
                s.state = "failed"
                ps_comm.cancel(s.recv)
                s.recv = s.sent = None  # never waited on: the worker may never receive it
                self._failure(
                    s, f"sent nothing for {self.cfg.timeout_s:g} s (ps.timeout_s) after its step {s.clock}"
                )

    def _failure(self, s: Slot, why: str) -> None:
        s.has_grad = s.skipped = False
        msg = f"worker rank {s.rank} {why} (global step {self.global_step})"
        self.logger.warning(msg)
        if not self.topo.is_root:
            return  # server 0 speaks and decides for the job
        if self.cfg.on_worker_failure == "stop":
            from hpcai.parallel.param_server import WorkerFailed

            last = self.checkpoints[-1]["step"] if self.checkpoints else None
            where = f"checkpoint of step {last}" if last is not None else "no checkpoint yet"
            raise WorkerFailed(f"{msg}; ps.on_worker_failure = 'stop': stopping the job ({where})")
        left = len(self._alive())
        self.reporter.say(f"warning: {msg}; continuing with {left} worker(s)")

    def _heartbeats(self) -> None:
        now = time.monotonic()
        for s in self.slots.values():
            if s.state == "held" and now - s.since >= self.cfg.heartbeat_s:
                ps_comm.send_beat(self.topo.ps_comm, s.rank)  # tiny, eager: completes without a wait
                s.since = now


# ------------------------------------------------------------------------------------ worker


def _batches(loader, clock: int):
    """This worker's batches from its step ``clock`` on, epoch after epoch (its own pace)."""
    spe = loader.steps_per_epoch
    epoch, start = divmod(clock, spe)
    while True:
        yield from loader.epoch(epoch, start)
        epoch, start = epoch + 1, 0


def run_worker_loop(topo, plan, model: nn.Module, flat, grad, loader, spec, logger, inject, slow) -> None:
    """Pull, compute, push until a server says stop; a failure of this worker is handled per
    ps.on_worker_failure ('continue': tell the servers and leave cleanly; 'stop': raise, the job ends).

    A step whose loss or gradient norm is not finite is not pushed (NONFINITE instead); when the servers
    stop the job for one, this worker says goodbye and raises :class:`hpcai.train.NonFiniteError`."""
    from hpcai.train import NONFINITE_KINDS, NonFiniteError, nonfinite_kind, total_norm

    comm, cfg, servers = topo.ps_comm, spec.ps, list(topo.server_ranks)
    out = [Message(plan.shard_sizes[s]) for s in servers]
    inn = [Message(plan.shard_sizes[s]) for s in servers]
    loss_fn = nn.CrossEntropyLoss()
    flat_np, grad_np = flat.numpy(), grad.numpy()
    heard = [time.monotonic()]

    def exchange(op: int, clock: int, loss: float, info: int | None = None) -> int:
        """Send ``op`` to every server, wait for every reply (parameters in place); the stop word (0: go on,
        STOP_BUDGET, STOP_NONFINITE). ``info``: the header's third word (default: the version read)."""
        recvs = [ps_comm.post_recv(inn[i], comm, s, TAG_REPLY) for i, s in enumerate(servers)]
        sends = []
        for i, s in enumerate(servers):
            word = inn[i].header[0] if info is None else info
            out[i].header[:] = (op, clock, word, _f2i(loss))
            if op == OP_PUSH:
                plan.pack(grad_np, s, out[i].body)
            sends.append(ps_comm.isend(out[i], comm, s, TAG_PUSH, header_only=op != OP_PUSH))
        heard[0] = time.monotonic()

        def beats() -> None:
            if ps_comm.drain_beats(comm):
                heard[0] = time.monotonic()

        try:
            ps_comm.wait_all(recvs + sends, lambda: heard[0] + cfg.timeout_s, beats)
        except TimeoutError as e:
            missing = sorted({servers[i % len(servers)] for i in e.args[0]})
            from hpcai.parallel.param_server import ServerFailed

            raise ServerFailed(
                f"server rank(s) {', '.join(map(str, missing))} sent no reply and no heartbeat for "
                f"{cfg.timeout_s:g} s (ps.timeout_s): stopping the job; rerun to resume from the last "
                "checkpoint"
            ) from None
        for i, s in enumerate(servers):
            plan.unpack(inn[i].body, s, flat_np)
        return max(int(m.header[1]) for m in inn)

    def farewell(op: int) -> None:
        sends = []
        for i, s in enumerate(servers):
            out[i].header[:] = (op, -1, 0, 0)
            sends.append(ps_comm.isend(out[i], comm, s, TAG_PUSH, header_only=True))
        try:
            ps_comm.wait_all(sends, lambda: time.monotonic() + cfg.timeout_s)
        except TimeoutError:
            logger.warning("a server did not take our farewell")

    stop = exchange(OP_PULL, -1, 0.0)
    clock = int(inn[0].header[2])  # where this worker's data resumes (0 on a fresh run)
    logger.info(f"worker {topo.worker_index}: starting at step {clock}")
    batches = _batches(loader, clock)
    model.train()
    while not stop:
        try:
            t0 = time.perf_counter()
            x, y = next(batches)
            grad.zero_()
            loss = loss_fn(model(x), y)
            loss.backward()
            if cfg.simulate_compute_s:
                time.sleep(cfg.simulate_compute_s)
            slow.after(time.perf_counter() - t0)
            if inject is not None and inject.poisons(clock + 1, topo.rank):
                loss = inject.poison(loss, [grad], logger)
            if inject is not None and inject.step == clock + 1:
                inject.fire(logger)
        except Exception as e:
            if cfg.on_worker_failure != "continue":
                raise
            import traceback

            logger.error(f"worker failed at step {clock}:\n{traceback.format_exc()}")
            sys.stderr.write(
                f"hpcai: rank {topo.rank}: error: {type(e).__name__}: {e}; leaving the job "
                "(ps.on_worker_failure = 'continue')\n"
            )
            farewell(OP_LEAVE)
            return
        value = float(loss.detach())
        kind = nonfinite_kind(value, total_norm([grad]))
        if kind and not math.isfinite(total_norm([flat])):
            kind = 5  # the parameters it pulled: no later step can be finite either
        if kind:
            logger.warning(f"step {clock + 1}: {NONFINITE_KINDS[kind]}: not pushed")
        stop = exchange(OP_NONFINITE, clock, value, kind) if kind else exchange(OP_PUSH, clock, value)
        clock += 1
    farewell(OP_DONE)
    logger.info(f"worker {topo.worker_index}: stopped after step {clock}")
    if stop == STOP_NONFINITE:
        raise NonFiniteError("stopped by the servers: a worker's step was not finite (rank 0 names it)")
