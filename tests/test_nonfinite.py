"""train.on_nonfinite: a diverging run stops at the step (exit 4, one line, no checkpoint of that state), or
drops the step's update on every rank alike ("skip", as AMP's GradScaler does)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hpcai import checkpoint as ckpt
from hpcai.data.loader import BatchLoader
from hpcai.data.shards import ShardedDataset
from hpcai.report import Reporter, rank_logger
from hpcai.spec import load_spec
from hpcai.train import MAX_SKIPS_IN_ROW, FailureInjection, NonFiniteError, Trainer
from tests.conftest import ROOT, run_cli

# ------------------------------------------------------------------------------------ in one process


class OneRank:
    """The strategy of a single process: no communication; gradients of ``scale`` x the loss, and a NaN loss
    from step ``nan_from`` on (a state every step of which diverges)."""

    world_size, is_root = 1, True

    def __init__(self, scale: float = 1.0, nan_from: int = 0):
        self.scale, self.nan_from, self.steps = scale, nan_from, 0

    def prepare(self, model: nn.Module) -> None:
        pass

    def train_step(self, model, x, y, loss_fn) -> torch.Tensor:
        model.zero_grad(set_to_none=False)
        self.steps += 1
        loss = loss_fn(model(x), y)
        if self.nan_from and self.steps >= self.nan_from:
            loss = loss * float("nan")
        (loss * self.scale).backward()
        return loss.detach()

    def sum(self, values: np.ndarray) -> np.ndarray:
        return values

    def max(self, values: np.ndarray) -> np.ndarray:
        return values

    def gather(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values)[None]


def _trainer(
    run_dir: Path,
    dataset: Path,
    *overrides: str,
    inject: str | None = None,
    writer: bool = False,
    strategy: OneRank | None = None,
):
    spec = load_spec(
        ROOT / "jobs/digits.toml",
        [
            f"data.path={json.dumps(str(dataset))}",
            "train.lr_schedule=constant",
            "train.log_every=1",
            *overrides,
        ],
        ranks=1,
    )
    data = ShardedDataset(spec.data.path)
    torch.manual_seed(0)
    # BatchNorm: "skip" must also put back the running statistics the dropped step's forward changed.
    width = int(np.prod(data.sample_shape))
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(width, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)
    )
    loader = BatchLoader(data.splits["train"], spec.train.batch_size, 0, 1, spec.train.seed, 0)
    run_dir.mkdir(parents=True, exist_ok=True)
    reporter = Reporter(run_dir, True, rank_logger(run_dir, 0), 10, time.time())
    w = ckpt.CheckpointWriter(run_dir, 100, False, log=lambda _m: None) if writer else None
    inj = FailureInjection.parse(inject) if inject else None
    return Trainer(spec, model, strategy or OneRank(), loader, reporter, 0, w, None, inj), data


def test_skip_drops_the_update_and_moves_the_schedule_on(tmp_path: Path, digits_dataset: Path) -> None:
    """Three steps whose third is NaN end with exactly the parameters, buffers and optimizer state of two
    steps; the step counter, the data position and the scheduler count three, as with AMP's scaler."""
    skip, data = _trainer(tmp_path / "a", digits_dataset, "train.steps=3", "train.on_nonfinite=skip",
                          inject="step=3,how=nan")  # fmt: skip
    result = skip.fit(data.splits["test"])
    two, _ = _trainer(tmp_path / "b", digits_dataset, "train.steps=2")
    two.fit(data.splits["test"])
    assert result.skipped_steps == 1 and skip.step == 3 and skip.step_in_epoch == 3
    assert skip.scheduler.last_epoch == 3 and two.scheduler.last_epoch == 2
    for (name, a), b in zip(skip.model.state_dict().items(), two.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for p_skip, p_two in zip(skip.model.parameters(), two.model.parameters(), strict=True):
        a, b = skip.optimizer.state[p_skip], two.optimizer.state[p_two]
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1]
    assert np.isnan(records[2]["loss"])  # the only step of that window was dropped: no loss to log


def test_stop_raises_before_the_update_and_writes_no_checkpoint(tmp_path: Path, digits_dataset: Path) -> None:
    trainer, data = _trainer(tmp_path, digits_dataset, "train.steps=5", "checkpoint.every_steps=1",
                             inject="step=3,how=nan", writer=True)  # fmt: skip
    with pytest.raises(NonFiniteError) as err:
        trainer.fit(data.splits["test"])
    msg = str(err.value)
    assert msg.startswith("step 3: loss is nan on rank 0 (train.lr = 0.1") and "\n" not in msg
    assert "no checkpoint written of this state" in msg and "step-00000002.h5" in msg
    assert err.value.exit_code == 4 and err.value.collective
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000001.h5", "step-00000002.h5"]
    assert trainer.step == 2  # the NaN step took no update


def test_no_checkpoint_of_non_finite_parameters(tmp_path: Path, digits_dataset: Path) -> None:
    """Finite gradients times a huge learning rate overflow the parameters: the checkpoint due after that
    update is not written, the job stops naming the step."""
    trainer, data = _trainer(tmp_path, digits_dataset, "train.steps=3", "checkpoint.every_steps=1",
                             "train.lr=3e38", writer=True, strategy=OneRank(scale=1e6))  # fmt: skip
    with pytest.raises(
        NonFiniteError, match=r"^step 1: parameters are not finite on rank 0 after its update"
    ):
        trainer.fit(data.splits["test"])
    assert ckpt.list_checkpoints(tmp_path) == []


def test_skip_stops_when_every_step_is_non_finite(tmp_path: Path, digits_dataset: Path) -> None:
    """A state whose every step is NaN would skip to the end (exit 0, final loss NaN): it stops at the
    MAX_SKIPS_IN_ROW-th skipped step in a row."""
    trainer, data = _trainer(tmp_path, digits_dataset, "train.steps=40", "train.on_nonfinite=skip",
                             strategy=OneRank(nan_from=3))  # fmt: skip
    with pytest.raises(
        NonFiniteError, match=rf", {MAX_SKIPS_IN_ROW} steps in a row: skipping steps cannot recover"
    ):
        trainer.fit(data.splits["test"])
    assert trainer.skipped_steps == MAX_SKIPS_IN_ROW - 1 and trainer.step == 2 + MAX_SKIPS_IN_ROW - 1


def test_skip_stops_on_non_finite_parameters(tmp_path: Path, digits_dataset: Path) -> None:
    """train.lr = 1e6: the parameters themselves overflow; no later step can be finite."""
    trainer, data = _trainer(tmp_path, digits_dataset, "train.steps=40", "train.lr=1e6",
                             "train.on_nonfinite=skip")  # fmt: skip
    with pytest.raises(
        NonFiniteError, match=r"the parameters are not finite on rank 0: skipping steps cannot"
    ):
        trainer.fit(data.splits["test"])


# ------------------------------------------------------------------------------------ end to end


def _data(dataset: Path) -> list[str]:
    return ["--set", f"data.path={json.dumps(str(dataset))}"]


def _one_error_line(stderr: str) -> str:
    """The job's only line on stderr: the error, naming the step, said once (not once per rank)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("hpcai: error: step ") and "no checkpoint written of this state" in lines[0]
    return lines[0]


def test_divergence_stops_data_parallel(tmp_path: Path, digits_dataset: Path) -> None:
    """The issue's case: --set train.lr=1e6 trained on in NaN to exit 0; now exit 4 at the first NaN step,
    every checkpoint before it, and the last one finite."""
    run_dir = tmp_path / "run"
    proc = run_cli("run", "jobs/digits.toml", "--run-dir", str(run_dir), *_data(digits_dataset),
                   "--set", "train.lr=1e6", "--set", "train.steps=40", "--set", "checkpoint.every_steps=2",
                   timeout=150)  # fmt: skip
    assert proc.returncode == 4, proc.stdout + proc.stderr
    line = _one_error_line(proc.stderr)
    step = int(
        re.match(r"hpcai: error: step (\d+): (loss|gradient norm) is (nan|inf) on rank [01] ", line)[1]
    )
    steps = [int(p.stem.split("-")[1]) for p in ckpt.list_checkpoints(run_dir)]
    assert steps and max(steps) < step, (steps, step)
    last = ckpt.read_checkpoint(ckpt.list_checkpoints(run_dir)[-1])
    assert all(np.isfinite(a).all() for k, a in last.arrays.items() if k.startswith("model/"))
    assert not (run_dir / "summary.json").exists()


def test_skip_is_decided_alike_on_every_rank(tmp_path: Path, digits_dataset: Path) -> None:
    """Only rank 1's loss and gradients are NaN at step 3 (after the all-reduce): both ranks drop that
    update, so the replicas stay bit-identical and training goes on."""
    run_dir = tmp_path / "run"
    proc = run_cli("run", "jobs/digits.toml", "--run-dir", str(run_dir), *_data(digits_dataset),
                   "--set", "train.steps=6", "--set", "train.log_every=3", "--set", "train.on_nonfinite=skip",
                   "--inject-failure", "step=3,rank=1,how=nan", timeout=150)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["params_identical_across_ranks"] and summary["skipped_steps"] == 1
    assert summary["steps"] == 6 and np.isfinite(summary["final_loss"])
    assert proc.stdout.count("step 3: loss is nan on rank 1: update dropped on every rank") == 1


def test_pipeline_stops_on_a_first_stage_nan(tmp_path: Path, digits_dataset: Path) -> None:
    """Stage 0 has no loss; its NaN gradients stop the last stage too, at the same step."""
    proc = run_cli("run", "jobs/digits_pipeline.toml", "--run-dir", str(tmp_path / "run"),
                   *_data(digits_dataset), "--set", "train.steps=6",
                   "--inject-failure", "step=2,rank=0,how=nan", timeout=150)  # fmt: skip
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert _one_error_line(proc.stderr).startswith("hpcai: error: step 2: gradient norm is nan on rank 0 ")


def test_parameter_server_stops_on_divergence(tmp_path: Path, digits_dataset: Path) -> None:
    """A worker's NaN is never pushed; the servers stop the job: exit 4, one line, no checkpoint."""
    run_dir = tmp_path / "run"
    proc = run_cli("run", "jobs/digits_ps.toml", "-n", "2", "--run-dir", str(run_dir), *_data(digits_dataset),
                   "--set", "train.lr=1e6", "--set", "train.steps=40", "--set", "checkpoint.every_steps=0",
                   timeout=150)  # fmt: skip
    assert proc.returncode == 4, proc.stdout + proc.stderr
    line = _one_error_line(proc.stderr)
    assert re.match(r"hpcai: error: step \d+ of worker rank 1: (loss|gradient norm) is (nan|inf) ", line), (
        line
    )
    assert ckpt.list_checkpoints(run_dir) == [] and not (run_dir / "summary.json").exists()
