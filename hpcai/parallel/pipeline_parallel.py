"""Pipeline x data parallelism: the strategy object the training loop talks to (it never sees MPI).

Each rank holds one stage (consecutive layers, ``partition.py``) of one data replica (``Topology.pipeline``).
A step splits this replica's share of the global batch into ``micro_batches``, runs the schedule
(``schedules.py``: GPipe or 1F1B) whose forwards and backwards pass activations and gradients to the
neighbouring stages (``pipeline_comm.py``), then averages each stage's gradients over its replicas with the
ring all-reduce (the data-parallel flat buffers, on the stage's ``dp_comm``) — once per step, after the last
micro-batch. The loss is known on the last stage only: ``train_step`` returns it there and None elsewhere.

Checkpoints hold the whole model in one file, named as in the whole model: each stage of replica 0 sends its
parameters and optimizer state (one flat buffer + a small name list) to rank 0, which writes them; on
resume every rank takes its stage's part of the file.
"""

from __future__ import annotations

import hashlib
import json
import resource
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hpcai import checkpoint as ckpt
from hpcai.comm.stall import StallWatch, WaitWatch, watched
from hpcai.data.loader import shard_range
from hpcai.errors import UserError
from hpcai.models import materialize
from hpcai.parallel import dp_comm, pipeline_comm
from hpcai.parallel.data_parallel import DataParallel
from hpcai.parallel.partition import as_sequential, param_offsets, stage_bounds, stage_module
from hpcai.parallel.pipeline_comm import PipelineComm
from hpcai.parallel.pipeline_stage import Stage
from hpcai.parallel.pipeline_trace import (
    ALLREDUCE,
    STEP,
    Timeline,
    bubble_theory,
    pipeline_bubble,
    plot_timeline,
    write_trace,
)
from hpcai.parallel.schedules import SCHEDULES
from hpcai.spec import CommSection, ParallelSection
from hpcai.topology import Topology


class PipelineShapeError(UserError):
    """A stage cannot take its predecessor's output (exit 2: the model or the split points are wrong)."""


class PipelineParallel:
    """Stages x replicas. ``bounds``/``offsets``: the cut (``partition.stage_bounds``/``param_offsets``);
    ``example``: two samples of the data (the shapes handshake runs them through the stages once)."""

    def __init__(
        self,
        topo: Topology,
        cfg: ParallelSection,
        bounds: list[int],
        offsets: list[int],
        example: torch.Tensor,
        comm: CommSection | None = None,
    ):
        self.topo, self.cfg, self.bounds, self.offsets = topo, cfg, bounds, offsets
        self.world_size, self.rank, self.is_root = topo.world_size, topo.rank, topo.is_root
        self.stage_index, self.stages = topo.pp_rank, topo.pp_size
        self.micro_batches = cfg.micro_batches
        self.schedule = SCHEDULES[cfg.schedule]
        self.tl = Timeline()
        # comm.stall_timeout_s / stall_abort watch the pipeline's receives as they watch collectives: a
        # neighbour that stops (stuck I/O, a hung node) is named instead of the pipeline waiting forever.
        stall = comm or CommSection()
        on = stall.stall_timeout_s > 0
        self.watch = WaitWatch(topo.rank, stall.stall_timeout_s, stall.stall_abort) if on else None
        # The whole job's small collectives (step flags, metrics) name the ranks that have not arrived.
        self.job_watch = (
            StallWatch(topo.job_comm, stall.stall_timeout_s, stall.stall_abort)
            if on and self.world_size > 1
            else None
        )
        self.comm = PipelineComm(topo.pp_comm, self.tl, self.watch)
        # The stage's replicas on dp_comm: broadcast, flat gradient buffers, ring all-reduce.
        stall_only = CommSection(stall_timeout_s=stall.stall_timeout_s, stall_abort=stall.stall_abort)
        self.dp = DataParallel(topo, comm=stall_only)
        self.example = example
        self.in_sample: tuple[tuple[int, ...], torch.dtype] | None = None  # per-sample shape, dtype in
        self.out_sample: tuple[tuple[int, ...], torch.dtype] | None = None
        self.stage: Stage | None = None
        self._allocated_for = -1
        self._steps = 0

    # ------------------------------------------------------------------------------- set-up
    def prepare(self, model: nn.Module) -> None:
        """Replica 0's stage on every replica, flat gradient buffers, the shapes handshake down the pipe."""
        self.dp.prepare(model)
        self._handshake(model)
        self.stage = Stage(model, self.comm, self.tl, self.cfg.recompute, self.cfg.offload)
        self.topo.job_comm.Barrier()
        self.tl.reset_clock()  # every rank's time 0 at (nearly) the same instant: traces line up

    def _handshake(self, model: nn.Module) -> None:
        """Once per run: each stage runs two zero samples of its input through its layers (eval mode, no grad:
        no running statistics or RNG touched) and tells the next stage the per-sample shape and dtype."""
        s = self.stage_index
        if s == 0:
            x = self.example
        else:
            shape, dtype_name = self.comm.recv_meta()
            x = torch.zeros((len(self.example), *shape), dtype=getattr(torch, dtype_name))
        self.in_sample = (tuple(x.shape[1:]), x.dtype)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(x)
        except Exception as e:  # noqa: BLE001 - any failure here is a wrong cut or a wrong model
            raise PipelineShapeError(
                f"pipeline stage {s} (rank {self.rank}) cannot take the output of stage {s - 1} "
                f"(rank {self.rank - 1}): per-sample shape {tuple(x.shape[1:])}, dtype "
                f"{str(x.dtype).removeprefix('torch.')}: {type(e).__name__}: {e}"
            ) from None
        finally:
            model.train(was_training)
        self.out_sample = (tuple(out.shape[1:]), out.dtype)
        if s < self.stages - 1:
            self.comm.send_meta((tuple(out.shape[1:]), str(out.dtype).removeprefix("torch.")))

    def _allocate(self, micro: int) -> None:
        if self._allocated_for == micro:
            return
        (ishape, idt), (oshape, odt) = self.in_sample, self.out_sample
        self.comm.allocate(self.micro_batches, (micro, *ishape), idt, (micro, *oshape), odt)
        self._allocated_for = micro

    # ------------------------------------------------------------------------------- the step
    def train_step(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Any
    ) -> torch.Tensor | None:
        """This replica's share of the batch through the pipeline, gradients of its mean loss averaged over
        the replicas; the loss on the last stage, None elsewhere."""
        if len(x) % self.micro_batches:
            raise ValueError(f"local batch {len(x)} does not split into {self.micro_batches} micro-batches")
        with self.tl.span(STEP):
            self._allocate(len(x) // self.micro_batches)
            self.dp.zero_grad()
            self.comm.step = self._steps + 1
            self.stage.begin(x, y, self.micro_batches, loss_fn)
            self.schedule(self.stage, self.micro_batches)
            self.comm.wait_sends()
        with self.tl.span(ALLREDUCE):
            self.dp.reduce_gradients()
        self._steps += 1
        if self._steps == 1:  # the first step allocates buffers and warms caches: time the steady state
            self.tl.totals[:] = 0
        return self.stage.loss if self.stage.last else None

    def evaluate(self, model: nn.Module, split, batch: int = 512) -> float:
        """Accuracy over the split, counted per target element as ``train.evaluate`` does; each replica
        scores a contiguous part through its pipeline (no grad)."""
        part = shard_range(len(split), self.topo.dp_rank, self.topo.dp_size)
        correct = total = 0
        first, last = self.stage_index == 0, self.stage_index == self.stages - 1
        model.eval()
        with torch.no_grad():
            for lo in range(part.start, part.stop, batch):
                rows = np.arange(lo, min(part.stop, lo + batch))
                if first or last:
                    xs, ys = split.read(rows)
                if first:
                    h = torch.from_numpy(xs)
                else:
                    shape, dtype = self.in_sample
                    h = self.comm.eval_recv((len(rows), *shape), dtype)
                out = model(h)
                if last:
                    correct += int((out.argmax(1) == torch.from_numpy(ys)).sum())
                    total += ys.size  # a label per sample, or a next token per position (B, T)
                else:
                    self.comm.eval_send(out.contiguous())
        model.train()
        counts = self.sum(np.array([correct, total], dtype=np.int64))
        return float(counts[0]) / max(1, int(counts[1]))

    # ------------------------------------------------------------------------------- whole-job collectives
    def _watched(self, label: str):
        return watched(self.job_watch, label)

    def sum(self, values: np.ndarray) -> np.ndarray:
        values = np.ascontiguousarray(values)
        if self.world_size > 1:
            with self._watched("sum of metrics"):
                dp_comm.allreduce_sum_(values, self.topo.job_comm)
        return values

    def max(self, values: np.ndarray) -> np.ndarray:
        values = np.ascontiguousarray(values)
        if self.world_size > 1:
            with self._watched("max of step flags"):
                dp_comm.allreduce_max_(values, self.topo.job_comm)
        return values

    def gather(self, values: np.ndarray) -> np.ndarray | None:
        with self._watched("gather of per-rank figures"):
            return dp_comm.gather_rows(np.ascontiguousarray(values), self.topo.job_comm)

    def params_digest(self, model: nn.Module) -> list[str] | None:
        """SHA-256 of this rank's stage, per world rank on rank 0 (a stage's replicas must agree)."""
        h = hashlib.sha256()
        for p in model.state_dict().values():
            h.update(dp_comm.as_bytes(p.detach().contiguous()).tobytes())
        return dp_comm.gather_strings(h.hexdigest(), self.topo.job_comm)

    def replicas_identical(self, digests: list[str]) -> bool:
        return all(len(set(digests[s :: self.stages])) == 1 for s in range(self.stages))

    # ------------------------------------------------------------------------------- checkpoints
    def state_for_checkpoint(self, model: nn.Module, optimizer, scheduler) -> ckpt.Payload | None:
        """Collective: the whole model's state on rank 0 (named as in the whole model), None elsewhere."""
        if self.topo.dp_rank != 0:
            return None  # replicas hold the same bits as replica 0
        local = ckpt.pack_state(model, optimizer, scheduler)
        shift = self.offsets[self.stage_index]
        arrays, dtypes = {}, {}
        for key, a in local.arrays.items():
            new = _shift_index(key, shift)
            arrays[new] = a
            dtypes[new] = json.loads(local.attrs["torch_dtypes"])[key]
        scalars = {str(int(i) + shift): v for i, v in json.loads(local.attrs["optimizer_scalars"]).items()}
        got = pipeline_comm.gather_arrays(arrays, (dtypes, scalars), self.topo.pp_comm)
        if got is None:
            return None
        merged, extras = got
        all_dtypes, all_scalars = {}, {}
        for d, sc in extras:
            all_dtypes.update(d)
            all_scalars.update(sc)
        groups = json.loads(local.attrs["optimizer_param_groups"])
        if len(groups) != 1:
            raise ValueError("pipeline checkpoints support one optimizer parameter group")
        groups[0]["params"] = list(range(self.offsets[-1]))
        payload = ckpt.Payload(arrays=merged, attrs=dict(local.attrs))
        payload.attrs.update(
            torch_dtypes=json.dumps(all_dtypes),
            optimizer_scalars=json.dumps(all_scalars),
            optimizer_param_groups=json.dumps(groups),
            pipeline_bounds=json.dumps(self.bounds),
        )
        return payload

    def load_from_checkpoint(self, payload: ckpt.Payload, model: nn.Module, optimizer, scheduler) -> None:
        """Take this stage's part of a whole-model checkpoint (every rank has read the file)."""
        names = set(model.state_dict())
        lo, hi = self.offsets[self.stage_index], self.offsets[self.stage_index + 1]
        dtypes = json.loads(payload.attrs["torch_dtypes"])
        arrays, sub_dtypes = {}, {}
        for key, a in payload.arrays.items():
            if key.startswith("model/") and key[6:] in names:
                arrays[key], sub_dtypes[key] = a, dtypes[key]
            elif key.startswith("optimizer/state/") and lo <= int(key.split("/")[2]) < hi:
                new = _shift_index(key, -lo)
                arrays[new], sub_dtypes[new] = a, dtypes[key]
        scalars = {
            str(int(i) - lo): v
            for i, v in json.loads(payload.attrs["optimizer_scalars"]).items()
            if lo <= int(i) < hi
        }
        groups = json.loads(payload.attrs["optimizer_param_groups"])
        groups[0]["params"] = list(range(hi - lo))
        attrs = dict(payload.attrs)
        attrs.update(
            torch_dtypes=json.dumps(sub_dtypes),
            optimizer_scalars=json.dumps(scalars),
            optimizer_param_groups=json.dumps(groups),
        )
        ckpt.unpack_state(ckpt.Payload(arrays=arrays, attrs=attrs), model, optimizer, scheduler)

    def stats(self) -> dict[str, Any]:
        """For summary.json: this rank's stall reports (pipeline waits and the replicas' all-reduces)."""
        watches = [w for w in (self.watch, self.job_watch, self.dp.watch) if w is not None]
        return {"stalls": [msg for w in watches for msg in w.stalls]}

    def close(self) -> None:
        """Collective: the stall watches free their windows."""
        if self.watch is not None:
            self.watch.close()
        if self.job_watch is not None:
            self.job_watch.close()
        self.dp.close()

    # ------------------------------------------------------------------------------- reports
    def report(self) -> dict[str, Any] | None:
        """Collective: bubble, memory and timing of every rank, as summary.json's ``pipeline`` (rank 0)."""
        st = self.tl.stats()
        s = self.stage
        row = np.array(
            [
                self.stage_index,
                self.topo.dp_rank,
                st["compute_s"],
                st["recv_wait_s"],
                st["send_s"],
                st["allreduce_s"],
                st["schedule_s"],
                st["bubble_fraction"],
                s.max_in_flight,
                s.peak_bytes,
                s.offloaded_bytes,
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
            ],
            dtype=np.float64,
        )
        rows = self.gather(row)
        if rows is None:
            return None
        keys = ["stage", "replica", "compute_s", "recv_wait_s", "send_s", "allreduce_s", "schedule_s"]
        keys += ["bubble_fraction", "max_in_flight", "peak_activation_bytes", "offloaded_bytes"]
        keys += ["peak_rss_bytes"]
        per_rank = [
            {k: (int(v) if k in _INT_KEYS else float(v)) for k, v in zip(keys, r, strict=True)} for r in rows
        ]
        pipeline_bubble(per_rank)

        def by_stage(key: str) -> list:
            return [max(r[key] for r in per_rank if r["stage"] == st_) for st_ in range(self.stages)]

        stage_compute = by_stage("compute_s")

        return {
            "stages": self.stages,
            "data_replicas": self.topo.dp_size,
            "micro_batches": self.micro_batches,
            "schedule": self.cfg.schedule,
            "recompute": self.cfg.recompute,
            "offload": self.cfg.offload,
            "bounds": self.bounds,
            "bubble_fraction": float(np.mean([r["bubble_fraction"] for r in per_rank])),
            "bubble_theory": bubble_theory(self.stages, self.micro_batches),
            # Unequal stages idle the lighter ones beyond the formula: slowest stage compute / mean - 1.
            "stage_imbalance": float(max(stage_compute) / np.mean(stage_compute) - 1.0),
            "max_in_flight_per_stage": by_stage("max_in_flight"),
            "peak_activation_bytes_per_stage": by_stage("peak_activation_bytes"),
            "peak_rss_bytes_per_stage": by_stage("peak_rss_bytes"),
            "per_rank": per_rank,
        }

    def write_trace(self, path: Path) -> None:
        """Collective: every rank's spans to rank 0, written as a Chrome/Perfetto trace and a PNG timeline."""
        parts = pipeline_comm.gather_rows_varying(self.tl.as_array(), self.topo.job_comm)
        if parts is None:
            return
        labels = [
            f"rank {r} (stage {r % self.stages}, replica {r // self.stages})" for r in range(self.world_size)
        ]
        path.parent.mkdir(parents=True, exist_ok=True)
        write_trace(path, parts, labels)
        plot_timeline(path.with_suffix(".png"), parts, labels)


def apply_pipeline_parallel(
    model: nn.Module | list[nn.Module],
    topo: Topology,
    cfg: ParallelSection,
    example: torch.Tensor,
    seed: int,
    comm: CommSection | None = None,
) -> tuple[nn.Sequential, PipelineParallel]:
    """This rank's stage of ``model`` and the strategy that runs it.

    ``model`` is either a skeleton on the meta device (a built-in model, ``models.model_skeleton``): then this
    rank allocates and initialises only its stage's blocks, each from its own seed, which are exactly the
    values ``models.build_model(..., seed)`` gives the whole model (one-process training starts from them
    too); the other stages' layers never take memory here. Or a whole model on the CPU (a user's factory,
    whose constructor may initialise as it likes): the caller drops its reference afterwards, and the other
    stages' layers are freed.
    """
    seq = as_sequential(model)
    bounds = stage_bounds(seq, topo.pp_size, cfg.split)
    offsets = param_offsets(seq, bounds)
    lo, hi = bounds[topo.pp_rank], bounds[topo.pp_rank + 1]
    if any(t.is_meta for t in [*seq[lo:hi].parameters(), *seq[lo:hi].buffers()]):
        materialize(seq, range(lo, hi), seed)
    stage = stage_module(seq, bounds, topo.pp_rank)
    return stage, PipelineParallel(topo, cfg, bounds, offsets, example, comm)


_INT_KEYS = {"stage", "replica", "max_in_flight", "peak_activation_bytes", "offloaded_bytes"}
_INT_KEYS |= {"peak_rss_bytes"}


def _shift_index(key: str, shift: int) -> str:
    """``optimizer/state/<i>/<name>`` -> ``optimizer/state/<i + shift>/<name>``; other keys unchanged."""
    if not key.startswith("optimizer/state/"):
        return key
    _, _, idx, name = key.split("/", 3)
    return f"optimizer/state/{int(idx) + shift}/{name}"
