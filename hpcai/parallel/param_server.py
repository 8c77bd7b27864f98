"""Parameter-server training (``train.strategy = "ps"``): sharded servers, async / ssp / bsp workers.

    hpcai run jobs/digits_ps.toml                                   # 1 server + 4 workers, async
    hpcai run jobs/digits_ps.toml --set ps.mode=ssp --set ps.staleness=2
    hpcai run jobs/digits_ps.toml -n 6 --set ps.servers=2           # 2 servers, 4 workers
    hpcai run jobs/digits_ps.toml --slow-rank 4:4                   # worker rank 4 four times slower
    mpiexec -n 5 python -m hpcai.worker runs/digits_ps/job.toml     # what `hpcai run` launches

Ranks ``0..R-1`` are servers, the rest workers (:meth:`Topology.param_server`). The model's parameters form
one flat float32 vector; :class:`ShardPlan` cuts it into R contiguous ranges of about the same bytes, moving
a cut to a tensor's edge where the tensor is small (small tensors stay whole; large ones are sliced). A server
keeps its shard and the job's optimizer over it (SGD momentum buffers, Adam moments live there only). Workers
loop pull -> gradient of their own batches -> push; the loops are in :mod:`hpcai.parallel.ps_loops`, the MPI
calls in :mod:`hpcai.parallel.ps_comm`. Rank 0 (server 0) writes metrics.jsonl, checkpoints (every server's
shard and optimizer state gathered into one HDF5 file with tensors named as in the full model, the same
layout as data parallel's) and summary.json.

A NaN/inf loss or gradient norm on a worker is never pushed; ``train.on_nonfinite`` decides whether the step
is dropped ("skip", counted as ``skipped_steps``) or the job ends with exit 4 and no checkpoint of that
state ("stop"); :mod:`hpcai.parallel.ps_loops` says how the servers agree.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from hpcai import checkpoint as ckpt
from hpcai.fsio import atomic_write_text
from hpcai.parallel import ps_comm
from hpcai.spec import JobSpec, TrainSection
from hpcai.train import lr_lambda, make_optimizer

# ------------------------------------------------------------------------------------ sharding


@dataclass(frozen=True)
class Piece:
    """``length`` floats of the flat parameter vector from ``start``, held by ``server`` at ``offset``."""

    server: int
    start: int
    length: int
    offset: int


@dataclass(frozen=True)
class ShardPlan:
    """Which server holds which part of the flat parameter vector. Same on every rank (pure function)."""

    total: int
    pieces: tuple[Piece, ...]
    shard_sizes: tuple[int, ...]

    @classmethod
    def build(cls, sizes: list[int], n_servers: int) -> ShardPlan:
        """Tensors of ``sizes`` (model order) over ``n_servers``: server s gets the contiguous range around
        [total*s/R, total*(s+1)/R). A cut that falls inside a tensor smaller than a quarter of a share moves
        to that tensor's nearer edge (small tensors stay whole); a larger tensor is sliced at the cut. So
        every server holds within a small tensor's size of total/R floats."""
        total = sum(sizes)
        share = total / n_servers
        edges = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        cuts = [0]
        for s in range(1, n_servers):
            c = int(round(share * s))
            i = int(np.searchsorted(edges, c, side="right")) - 1  # the tensor holding float c
            if i < len(sizes) and edges[i] < c and sizes[i] < share / 4:
                c = int(edges[i]) if c - edges[i] <= edges[i + 1] - c else int(edges[i + 1])
            cuts.append(max(c, cuts[-1]))
        cuts.append(total)
        pieces = []
        for s in range(n_servers):
            lo, hi, offset = cuts[s], cuts[s + 1], 0
            for i in range(len(sizes)):  # this server's part of each tensor, in model order
                a, b = max(lo, int(edges[i])), min(hi, int(edges[i + 1]))
                if b > a:
                    pieces.append(Piece(s, a, b - a, offset))
                    offset += b - a
        return cls(total, tuple(pieces), tuple(cuts[s + 1] - cuts[s] for s in range(n_servers)))

    def of(self, server: int) -> list[Piece]:
        return [p for p in self.pieces if p.server == server]

    def pack(self, flat: np.ndarray, server: int, out: np.ndarray) -> None:
        """``out`` (the server's shard layout) <- its pieces of ``flat`` (the model layout)."""
        for p in self.of(server):
            out[p.offset : p.offset + p.length] = flat[p.start : p.start + p.length]

    def unpack(self, shard: np.ndarray, server: int, flat: np.ndarray) -> None:
        for p in self.of(server):
            flat[p.start : p.start + p.length] = shard[p.offset : p.offset + p.length]

    def assemble(self, by_server: np.ndarray, flat: np.ndarray) -> None:
        """``flat`` <- the servers' shards concatenated in server order (what a gather delivers)."""
        base = np.concatenate([[0], np.cumsum(self.shard_sizes)[:-1]])
        for p in self.pieces:
            src = base[p.server] + p.offset
            flat[p.start : p.start + p.length] = by_server[src : src + p.length]


def flatten_model(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Point every trainable parameter's data and grad into two flat float32 vectors (model order)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if any(p.dtype != torch.float32 for p in params):
        raise ValueError("train.strategy = 'ps' supports float32 parameters only")
    n = sum(p.numel() for p in params)
    flat, grad = torch.zeros(n), torch.zeros(n)
    offset = 0
    with torch.no_grad():
        for p in params:
            k = p.numel()
            flat[offset : offset + k].copy_(p.data.reshape(-1))
            p.data = flat[offset : offset + k].view_as(p)
            p.grad = grad[offset : offset + k].view_as(p)
            offset += k
    return flat, grad


# ------------------------------------------------------------------------------------ one server's shard


class ShardOptimizer:
    """A server's shard of the parameters and the job's optimizer over it (elementwise: SGD, Adam, AdamW).

    Workers' gradients are applied with the learning rate of the global step (warm-up, cosine), so the
    schedule spans the job's train.steps / epochs as in data parallel.

    ``pushes_per_step`` = W > 1 (async and ssp with ps.update_rule = "matched"): every push is its own
    optimizer step, and W of them must move the parameters as one data-parallel step over the global batch
    does. So each push steps with lr / W, SGD's momentum decays by beta^(1/W) per push and is damped by
    (1 - beta^(1/W)) / (1 - beta) so that the buffer's steady state is gradient / (1 - beta), as in data
    parallel; Adam's betas become beta^(1/W). Buffers keep data parallel's units, so a checkpoint resumes
    in any ps.mode. Without this, momentum 0.9 decays 0.9^W per global step and, on top of the implicit
    momentum that asynchrony adds (Mitliagkas et al. 2016), cost digits 1.5 accuracy points in 6 seeds.
    """

    def __init__(self, values: np.ndarray, cfg: TrainSection, n_steps: int, pushes_per_step: int = 1):
        self.holder = nn.Module()
        self.holder.shard = nn.Parameter(torch.from_numpy(values.astype(np.float32, copy=True)))
        self.shard = self.holder.shard
        self.shard.grad = torch.zeros_like(self.shard)
        self.optimizer = make_optimizer(self.holder, cfg)
        self.peak_lr, self.schedule = cfg.lr, lr_lambda(cfg, n_steps)
        self.lr_factor = 1.0 / pushes_per_step
        if pushes_per_step > 1:
            root = 1.0 / pushes_per_step
            for group in self.optimizer.param_groups:
                if "betas" in group:
                    group["betas"] = tuple(b**root for b in group["betas"])
                elif group["momentum"] > 0:
                    beta = group["momentum"]
                    group["momentum"] = beta**root
                    group["dampening"] = 1.0 - (1.0 - beta**root) / (1.0 - beta)

    def lr(self, global_step: int) -> float:
        return self.peak_lr * self.schedule(global_step)

    def apply(self, grad: np.ndarray, scale: float, global_step: int) -> None:
        """One optimizer step with ``grad * scale`` at the learning rate of ``global_step``
        (times 1 / pushes_per_step)."""
        with torch.no_grad():
            self.shard.grad.copy_(torch.from_numpy(grad)).mul_(scale)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr(global_step) * self.lr_factor
        self.optimizer.step()

    def values(self) -> np.ndarray:
        return self.shard.detach().numpy()

    def state_keys(self) -> list[str]:
        """Optimizer state tensors shaped like the shard (momentum_buffer, exp_avg, ...), sorted."""
        state = self.optimizer.state.get(self.shard, {})
        return sorted(k for k, v in state.items() if torch.is_tensor(v) and v.numel() == self.shard.numel())

    def state(self, key: str) -> np.ndarray:
        return self.optimizer.state[self.shard][key].detach().numpy()

    def scalars(self) -> dict[str, Any]:
        """Per-parameter scalars (Adam's step), as plain numbers."""
        out = {}
        for k, v in self.optimizer.state.get(self.shard, {}).items():
            if k not in self.state_keys():
                out[k] = float(v) if torch.is_tensor(v) else v
        return out

    def load(self, values: np.ndarray, state: dict[str, np.ndarray], scalars: dict[str, Any]) -> None:
        with torch.no_grad():
            self.shard.copy_(torch.from_numpy(values))
        st = self.optimizer.state[self.shard]
        for k, a in state.items():
            st[k] = torch.from_numpy(a.astype(np.float32, copy=True))
        for k, v in scalars.items():
            st[k] = torch.tensor(float(v)) if k == "step" else v


# ------------------------------------------------------------------------------------ checkpoints


def gather_checkpoint(topo, plan: ShardPlan, opt: ShardOptimizer, timeout_s: float) -> dict[str, np.ndarray]:
    """Collective over the servers: every shard and its optimizer state, assembled in model layout on
    server 0 (``{"params": flat, "<state key>": flat, ...}``); other servers get {}."""
    keys = opt.state_keys()  # the same on every server: each applies the same count of updates
    out = {}
    for key in ["params", *keys]:
        send = np.ascontiguousarray(opt.values() if key == "params" else opt.state(key))
        recv = np.empty(plan.total, np.float32) if topo.is_root else None
        ps_comm.gatherv_(send, recv, list(plan.shard_sizes), topo.server_comm, timeout_s, f"checkpoint {key}")
        if topo.is_root:
            out[key] = np.empty(plan.total, np.float32)
            plan.assemble(recv, out[key])
    return out


def build_payload(
    model: nn.Module, flat: torch.Tensor, gathered: dict[str, np.ndarray], scalars: dict, spec: JobSpec
) -> ckpt.Payload:
    """Server 0: a checkpoint in data parallel's layout (``/model/<name>``, ``/optimizer/state/<i>/<key>``)
    from the gathered flat vectors, via a full-model optimizer that only ever holds this state."""
    with torch.no_grad():
        flat.copy_(torch.from_numpy(gathered["params"]))
    full_opt = make_optimizer(model, spec.train)
    params = [p for p in model.parameters() if p.requires_grad]
    state: dict[int, dict[str, Any]] = {}
    offset = 0
    for i, p in enumerate(params):
        k = p.numel()
        entry: dict[str, Any] = {
            key: torch.from_numpy(a[offset : offset + k].copy()).view_as(p)
            for key, a in gathered.items()
            if key != "params"
        }
        for key, v in scalars.items():
            entry[key] = torch.tensor(float(v)) if key == "step" else v
        if entry:
            state[i] = entry
        offset += k
    full_opt.load_state_dict({"state": state, "param_groups": full_opt.state_dict()["param_groups"]})
    sched = torch.optim.lr_scheduler.LambdaLR(full_opt, lambda _: 1.0)
    return ckpt.pack_state(model, full_opt, sched)


def load_shard(
    payload: ckpt.Payload, model: nn.Module, plan: ShardPlan, server: int, opt: ShardOptimizer
) -> None:
    """This server's shard and optimizer state from a checkpoint of any server count."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    flat = np.zeros(plan.total, np.float32)
    states: dict[str, np.ndarray] = {}
    offset = 0
    for i, (name, p) in enumerate(params):
        k = p.numel()
        a = payload.arrays.get(f"model/{name}")
        if a is None or tuple(a.shape) != tuple(p.shape):
            raise ckpt.CheckpointError(f"checkpoint tensor model/{name} is missing or has another shape")
        flat[offset : offset + k] = a.reshape(-1)
        for key, arr in payload.arrays.items():
            prefix = f"optimizer/state/{i}/"
            if key.startswith(prefix) and arr.size == k and arr.ndim > 0:
                states.setdefault(key[len(prefix) :], np.zeros(plan.total, np.float32))[
                    offset : offset + k
                ] = arr.reshape(-1)
        offset += k
    shard = np.zeros(plan.shard_sizes[server], np.float32)
    plan.pack(flat, server, shard)
    shard_states = {}
    for key, full in states.items():
        shard_states[key] = np.zeros_like(shard)
        plan.pack(full, server, shard_states[key])
    scalars = json.loads(payload.attrs.get("ps_scalars", "{}"))
    opt.load(shard, shard_states, scalars)


# ------------------------------------------------------------------------------------ the entry point


class WorkerFailed(RuntimeError):
    """A worker failed and ps.on_worker_failure = 'stop'."""


class ServerFailed(RuntimeError):
    """A server stopped answering: the job stops; a rerun resumes from the last checkpoint."""


def hist_dict(hist: dict[int, int]) -> dict[str, int]:
    return {str(k): hist[k] for k in sorted(hist)}


def train_ps(spec: JobSpec, topo, t0: float) -> dict | None:
    """Train ``spec`` with parameter servers on ``topo`` (:meth:`Topology.param_server`); rank 0 gets the
    summary, other ranks None.

    Started by :func:`hpcai.worker.train_job` when ``train.strategy = "ps"``.
    """
    from hpcai.data.loader import BatchLoader, check_batch_fits
    from hpcai.data.shards import ShardedDataset
    from hpcai.models import build_model
    from hpcai.parallel.ps_loops import Server, SlowDown, run_worker_loop
    from hpcai.report import Reporter, rank_logger, truncate_metrics, versions, write_run_outputs
    from hpcai.train import FailureInjection, NonFiniteError, evaluate, total_steps
    from hpcai.worker import _ensure_dataset, _select_checkpoint

    if topo.n_servers == 0:  # e.g. a sweep trial's data-parallel sub-communicator
        from hpcai.errors import UserError

        raise UserError(f"{spec.source}: train.strategy: 'ps' needs its own world (hpcai run), not this one")
    run_dir = spec.run_dir
    resume_path = None
    if topo.is_root:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "job.toml", spec.to_toml())  # a full disk: one line, no empty file
        _ensure_dataset(spec, print)
        resume_path = _select_checkpoint(spec, os.environ.get("HPCAI_RESUME", "auto"), print)
        if resume_path is None:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    resume_path = topo.world.bcast(str(resume_path) if resume_path else None, root=0)  # a path: metadata
    inject = os.environ.get("HPCAI_INJECT_FAILURE")
    inject = FailureInjection.parse(inject) if inject else None
    if inject is not None and inject.rank != topo.rank:
        inject = None
    logger = rank_logger(run_dir, topo.rank)
    role = "server" if topo.is_server else "worker"
    logger.info(f"start: {role}, world {topo.world_size}, pid {os.getpid()}, resume={resume_path or 'none'}")

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(spec.train.seed)
    data = ShardedDataset(spec.data.path)
    model = build_model(spec.model, data.sample_shape, data.num_classes, seed=spec.train.seed)
    flat, grad = flatten_model(model)
    ps_comm.bcast_(flat.numpy(), topo.ps_comm)  # rank 0's initial parameters everywhere (all ranks alive)
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    plan = ShardPlan.build(sizes, topo.n_servers)
    check_batch_fits(data.splits["train"], spec.train.batch_size)  # one line, exit 2
    steps_per_epoch = len(data.splits["train"]) // spec.train.batch_size
    n_steps = total_steps(spec.train, steps_per_epoch)
    payload = ckpt.read_checkpoint(Path(resume_path), verify=False) if resume_path else None

    if not topo.is_server:
        loader = BatchLoader(
            data.splits["train"], spec.train.batch_size, topo.worker_index, topo.n_workers, spec.train.seed,
            spec.data.prefetch,
        )  # fmt: skip
        slow = SlowDown.from_env(topo.rank)
        ps_comm.barrier(topo.ps_comm)  # the servers may take longer to start than a worker's ps.timeout_s
        run_worker_loop(topo, plan, model, flat, grad, loader, spec, logger, inject, slow)
        data.close()
        return None

    shard = np.zeros(plan.shard_sizes[topo.rank], np.float32)
    plan.pack(flat.numpy(), topo.rank, shard)
    matched = spec.ps.mode != "bsp" and spec.ps.update_rule == "matched"
    opt = ShardOptimizer(shard, spec.train, n_steps, topo.n_workers if matched else 1)
    if payload is not None:
        load_shard(payload, model, plan, topo.rank, opt)
        if topo.is_root:
            truncate_metrics(run_dir, payload.step, print)
    reporter = Reporter(run_dir, topo.is_root, logger, n_steps, t0)
    writer = (
        ckpt.CheckpointWriter(run_dir, spec.checkpoint.keep, False, log=logger.info) if topo.is_root else None
    )

    def save(server: Server) -> None:
        """Collective over the servers at the same version: gather, and server 0 commits the file.

        First the servers agree (one tiny all-reduce) that none is stopping for a non-finite step and that
        every shard is finite; otherwise nothing is written, and non-finite parameters stop the job."""
        flags = np.array([server.stopping is not None, not np.isfinite(opt.values()).all()], np.int64)
        if topo.n_servers > 1:
            ps_comm.allreduce_max_(flags, topo.server_comm)
        if flags[1]:
            server.stop_for(f"step {server.global_step}: parameters are not finite after its update")
        if flags.any():
            return
        gathered = gather_checkpoint(topo, plan, opt, 2 * spec.ps.timeout_s)
        if writer is None:
            server.checkpoints.append({"step": server.global_step})
            return
        p = build_payload(model, flat, gathered, opt.scalars(), spec)
        step = server.global_step
        p.attrs.update(
            step=step, epoch=step // steps_per_epoch, step_in_epoch=0,
            samples_seen=step * spec.train.batch_size,
            last_loss=server.last_loss, world_size=topo.world_size, shuffle_seed=spec.train.seed,
            spec=json.dumps(spec.to_dict(), sort_keys=True), spec_sha256=spec.spec_hash(),
            ps_scalars=json.dumps(opt.scalars()), **server.state_attrs(),
        )  # fmt: skip
        p.arrays.update(server.state_arrays())
        path = writer.save(p)
        server.checkpoints.append({"step": step, "file": path.name, "block_s": writer.last_block_s})
        logger.info(f"checkpoint {path.name}")

    server = Server(topo, plan, opt, spec, n_steps, reporter, logger, inject, save, steps_per_epoch)
    if payload is not None:
        server.restore(payload)
    reporter.say(
        f"{spec.job.name}: {type(model).__name__} with {plan.total:,} parameters, {topo.n_servers} server(s) "
        f"holding {list(plan.shard_sizes)} floats, {topo.n_workers} workers, mode {spec.ps.mode}, "
        f"global batch {spec.train.batch_size} -> {run_dir}"
    )
    ps_comm.barrier(topo.ps_comm)
    try:
        result = server.run()
    finally:
        reporter.close()
    if spec.checkpoint.final and server.stopping is None:  # every server: the gather is collective
        save(server)
    if server.stopping is not None:  # every server knows by now: each saw the worker's NONFINITE
        if writer is not None:
            writer.wait()
        last = ""
        if topo.is_root:
            found = ckpt.list_checkpoints(run_dir)
            last = f" (last good: {found[-1]})" if found else " (none was written before it)"
        raise NonFiniteError(
            f"{server.stopping} (train.lr = {spec.train.lr:g}; train.on_nonfinite = "
            f"'{spec.train.on_nonfinite}'); stopped, no checkpoint written of this state{last}"
        )
    gathered = gather_checkpoint(topo, plan, opt, 2 * spec.ps.timeout_s)
    if writer is not None:
        writer.wait()
    if not topo.is_root:
        data.close()
        return None
    with torch.no_grad():
        flat.copy_(torch.from_numpy(gathered["params"]))
    accuracy = evaluate(model, data.splits["test"], SimpleNamespace(world_size=1, sum=lambda a: a), 0)
    data.close()
    local_batch = spec.train.batch_size // topo.n_workers
    summary = {
        "job": spec.job.name,
        "world_size": topo.world_size,
        "strategy": "ps",
        "mode": spec.ps.mode,
        "servers": topo.n_servers,
        "workers": topo.n_workers,
        "steps": server.global_step,
        "epochs": server.global_step / steps_per_epoch,
        "final_loss": server.last_loss,
        "test_accuracy": accuracy,
        "wall_s": time.time() - t0,
        "train_s": result.train_s,
        "updates": result.updates,
        "updates_per_s": result.updates / max(result.train_s, 1e-9),
        "samples_per_s": result.updates * local_batch / max(result.train_s, 1e-9),
        "updates_per_worker": {str(r): n for r, n in result.updates_per_worker.items()},
        "staleness_histogram": hist_dict(result.staleness),
        "max_staleness": max(result.staleness, default=0),
        "delay_histogram": hist_dict(result.delay),
        "staleness_bound": spec.ps.staleness
        if spec.ps.mode == "ssp"
        else (0 if spec.ps.mode == "bsp" else None),
        "skipped_steps": server.skipped,
        "failed_workers": result.failed,
        "left_workers": result.left,
        "shard_floats": list(plan.shard_sizes),
        "dataset": str(Path(spec.data.path).resolve()),
        "model_parameters": plan.total,
        "spec_sha256": spec.spec_hash(),
        "resumed_from_step": server.resumed_from,
        "checkpoints": server.checkpoints,
        "versions": versions(),
    }
    write_run_outputs(run_dir, summary, f"{spec.job.name}: ps {spec.ps.mode}, {topo.n_workers} workers")
    reporter.say(
        f"done: {server.global_step} steps ({result.updates} updates, {summary['updates_per_s']:.0f}/s), "
        f"final loss {server.last_loss:.4f}, test accuracy {accuracy:.4f}, max staleness "
        f"{summary['max_staleness']}, {summary['wall_s']:.1f} s wall"
    )
    if result.failed:
        # A hung worker is alive and silent: MPI_Finalize and mpiexec would wait for it forever. Training is
        # done and written, so end the job here with status 0.
        from hpcai.comm.abort import abort_job

        abort_job(
            f"hpcai: worker rank(s) {', '.join(map(str, result.failed))} stopped answering and are still "
            "running; training finished without them; ending the job (MPI_Abort with status 0)",
            0,
            topo.world,
        )
    return summary
