"""Checkpoints: HDF5 contents without pickle, checksums, atomic commit and pruning, and bit-exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from hpcai import checkpoint as ckpt
from tests.conftest import ROOT, cli_env, run_cli

# ------------------------------------------------------------------------------------ unit


def _model_and_opt(kind: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    opt = (
        torch.optim.Adam(model.parameters(), lr=1e-3)
        if kind == "adam"
        else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(16, 4)).sum().backward()
        opt.step()
        sched.step()
    return model, opt, sched


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_state_round_trips_exactly(tmp_path: Path, kind: str) -> None:
    model, opt, sched = _model_and_opt(kind)
    payload = ckpt.pack_state(model, opt, sched)
    payload.attrs.update(step=3, epoch=0, step_in_epoch=3, world_size=1, spec="{}")
    path = tmp_path / "c.h5"
    ckpt.write_checkpoint(path, payload)
    m2, o2, s2 = _model_and_opt(kind)
    for p in m2.parameters():
        p.data.add_(1.0)
    ckpt.unpack_state(ckpt.read_checkpoint(path), m2, o2, s2)
    for a, b in zip(model.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert json.dumps(o2.state_dict()["param_groups"]) == json.dumps(opt.state_dict()["param_groups"])
    for (_, sa), (_, sb) in zip(
        opt.state_dict()["state"].items(), o2.state_dict()["state"].items(), strict=True
    ):
        assert sa.keys() == sb.keys() and all(
            torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])) for k in sa
        )
    assert s2.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"] == 3


def test_bfloat16_and_rng_states_survive(tmp_path: Path) -> None:
    t = torch.randn(5, 3).to(torch.bfloat16)
    a, name = ckpt.tensor_to_array(t)
    assert name == "bfloat16" and torch.equal(ckpt.array_to_tensor(a.copy(), name), t)
    import random

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    blob = ckpt.pack_rng()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.unpack_rng(blob)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_file_is_plain_hdf5_without_pickle(tmp_path: Path) -> None:
    model, opt, sched = _model_and_opt("sgd")
    payload = ckpt.pack_state(model, opt, sched)
    payload.attrs.update(step=1, epoch=0, step_in_epoch=1, world_size=1, spec="{}")
    path = tmp_path / "c.h5"
    ckpt.write_checkpoint(path, payload)
    with h5py.File(path) as f:
        kinds = set()
        f.visititems(lambda n, o: kinds.add(o.dtype.kind) if isinstance(o, h5py.Dataset) else None)
        assert kinds <= {"f", "i", "u", "b"}  # numbers only: no object or opaque (pickled) data
        assert all(isinstance(v, (str, int, float, np.generic)) for v in f.attrs.values())
        assert "crc32c" in f["model/0.weight"].attrs
    assert b"pickle" not in path.read_bytes()


def test_large_aligned_arrays_go_direct_and_read_back_exactly(tmp_path: Path, monkeypatch) -> None:
    """Large arrays are written with O_DIRECT at offsets HDF5 laid out (the odd-sized tail through the page
    cache): from their own memory when it is 4 KiB-aligned (the async writer's snapshot buffers), else through
    the staging buffer (live tensors), here 1 MiB so that a 3 MiB array takes several rounds; small ones by
    h5py."""
    import os
    import zlib

    rng = np.random.default_rng(0)
    arrays = {
        "big/odd": rng.standard_normal(1_000_003).astype(np.float32),  # 4,000,012 bytes: bulk + tail
        "big/even": rng.standard_normal((512, 1024)).astype(np.float32),
        "small": rng.standard_normal(10).astype(np.float32),
    }
    aligned = {k: ckpt.aligned_empty(a.shape, a.dtype) for k, a in arrays.items()}
    for k, a in arrays.items():
        np.copyto(aligned[k], a)
    unaligned = np.empty(786_434, np.float32)[1:]  # 3 MiB + 4 bytes, 4 bytes past numpy's 16-byte alignment
    assert unaligned.ctypes.data % ckpt.ALIGN != 0
    unaligned[:] = rng.standard_normal(786_433)
    arrays["big/unaligned"] = aligned["big/unaligned"] = unaligned
    monkeypatch.setattr(ckpt, "STAGE_BYTES", 1 << 20)
    opened: list[int] = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, flags, *a: opened.append(flags) or real_open(p, flags, *a))
    payload = ckpt.Payload(arrays=aligned, attrs=dict(step=1, epoch=0, step_in_epoch=1, world_size=1))
    path = tmp_path / "d.h5"
    ckpt.write_checkpoint(path, payload)
    assert any(f & getattr(os, "O_DIRECT", 0) for f in opened) == hasattr(os, "O_DIRECT")
    with h5py.File(path) as f:
        for k, a in arrays.items():
            np.testing.assert_array_equal(f[k][()], a)
            if a.nbytes >= ckpt.DIRECT_MIN_BYTES:
                assert f[k].id.get_offset() % ckpt.ALIGN == 0 and f[k].chunks is None
            assert ckpt._checksum_ok(f[k], f[k][()])  # the CRC-32C of what is on disk
    # A checkpoint from before CRC-32C (zlib's crc32 attribute) is still verified.
    with h5py.File(path, "r+") as f:
        ds = f["big/odd"]
        del ds.attrs["crc32c"]
        ds.attrs["crc32"] = np.uint32(zlib.crc32(arrays["big/odd"].tobytes()))
        assert ckpt._checksum_ok(ds, ds[()])
        assert not ckpt._checksum_ok(ds, ds[()] + 1)


def test_corrupt_and_truncated_newest_are_skipped(tmp_path: Path) -> None:
    model, opt, sched = _model_and_opt("sgd")
    writer = ckpt.CheckpointWriter(tmp_path, keep=2, async_save=False)
    for step in (10, 20, 30):
        p = ckpt.pack_state(model, opt, sched)
        p.attrs.update(step=step, epoch=0, step_in_epoch=step, world_size=1, spec="{}")
        writer.save(p)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step-00000020.h5", "step-00000030.h5"]  # keep=2, oldest pruned after the newer commit
    newest = ckpt.checkpoint_path(tmp_path, 30)
    with h5py.File(newest, "r") as f:
        offset = f["model/0.weight"].id.get_offset()
    data = bytearray(newest.read_bytes())
    data[offset + 3] ^= 0x40  # flip a bit inside a tensor
    newest.write_bytes(bytes(data))
    warnings: list[str] = []
    path, payload = ckpt.find_resumable(tmp_path, warn=warnings.append)
    assert path.name == "step-00000020.h5" and payload.step == 20
    assert "step-00000030.h5" in warnings[0] and "CRC-32" in warnings[0]
    older = ckpt.checkpoint_path(tmp_path, 20)
    older.write_bytes(older.read_bytes()[: older.stat().st_size // 2])  # truncated
    assert ckpt.find_resumable(tmp_path, warn=warnings.append) is None
    assert "unreadable" in warnings[-1]


def test_async_writer_snapshots_before_returning(tmp_path: Path) -> None:
    model, opt, sched = _model_and_opt("sgd")
    writer = ckpt.CheckpointWriter(tmp_path, keep=3, async_save=True)
    p = ckpt.pack_state(model, opt, sched)
    p.attrs.update(step=5, epoch=0, step_in_epoch=5, world_size=1, spec="{}")
    expected = model[0].weight.detach().clone()
    writer.save(p)
    with torch.no_grad():
        model[0].weight.add_(100.0)  # training goes on while the thread writes
    writer.wait()
    stored = ckpt.read_checkpoint(ckpt.checkpoint_path(tmp_path, 5)).arrays["model/0.weight"]
    assert np.array_equal(stored, expected.numpy())
    assert not list(tmp_path.glob("checkpoints/.*.tmp"))


def test_deferred_arrays_are_copied_by_the_thread_before_fence_returns(tmp_path: Path) -> None:
    """Parameters and optimizer state are snapshotted while training runs on; fence() (before the optimizer
    step) waits for that copy, so what the step then changes is not in the file. A buffer is copied
    at once."""
    writer = ckpt.CheckpointWriter(tmp_path, keep=3, async_save=True)
    big = np.arange(8_000_000, dtype=np.float32)  # 32 MB: its copy takes a while
    buf = np.ones(16, dtype=np.float32)
    attrs = dict(step=7, epoch=0, step_in_epoch=7, world_size=1, spec="{}", torch_dtypes="{}")
    p = ckpt.Payload(arrays={"model/w": big, "model/running_mean": buf}, attrs=attrs)
    writer.save(p, deferred={"model/w"})
    buf += 1  # a forward pass updating a buffer right after save returns
    assert writer.fence() >= 0.0 and writer.fence() == 0.0  # a second fence has nothing to wait for
    big += 1  # the optimizer step
    writer.wait()
    stored = ckpt.read_checkpoint(ckpt.checkpoint_path(tmp_path, 7)).arrays
    assert np.array_equal(stored["model/w"], np.arange(8_000_000, dtype=np.float32))
    assert np.array_equal(stored["model/running_mean"], np.ones(16, dtype=np.float32))


def test_spec_differences_ignore_restart_keys() -> None:
    a = {"job": {"ranks": 2, "run_dir": "x"}, "train": {"lr": 0.1, "epochs": 5}}
    b = {"job": {"ranks": 4, "run_dir": "y"}, "train": {"lr": 0.2, "epochs": 5}}
    assert ckpt.spec_differences(a, b) == ["train.lr: 0.1 -> 0.2"]
    # A checkpoint from before a section existed: its keys had their defaults then.
    from hpcai.spec import JobSpec

    now = JobSpec().to_dict()
    old = {k: v for k, v in now.items() if k != "comm"}
    assert ckpt.spec_differences(old, now) == []


# ------------------------------------------------------------------------------------ end to end (mpiexec)

SHORT = ["--set", "train.epochs=6", "--set", "checkpoint.every_steps=7", "--set", "train.log_every=5"]


def _run(run_dir: Path, dataset: Path, *extra: str, timeout: float = 180) -> subprocess.CompletedProcess:
    data = ["--set", f"data.path={json.dumps(str(dataset))}"]
    return run_cli(
        "run", "jobs/digits.toml", "--run-dir", str(run_dir), *data, *SHORT, *extra, timeout=timeout
    )


def _metrics(run_dir: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["epoch"], r["loss"], r["lr"]) for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, digits_dataset: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    proc = _run(run_dir, digits_dataset)
    assert proc.returncode == 0, proc.stderr
    return run_dir


def _assert_same_as_reference(run_dir: Path, reference: Path) -> dict:
    a = json.loads((reference / "summary.json").read_text())
    b = json.loads((run_dir / "summary.json").read_text())
    assert b["params_sha256"] == a["params_sha256"]  # bit-identical parameters
    assert b["final_loss"] == a["final_loss"] and b["test_accuracy"] == a["test_accuracy"]
    assert _metrics(run_dir) == _metrics(reference)  # the resumed part of metrics.jsonl too
    return b


def test_kill_minus_9_mid_epoch_then_resume_is_bit_identical(
    tmp_path: Path, digits_dataset: Path, reference: Path
):
    run_dir = tmp_path / "run"
    # Step 31 is mid-epoch (22 steps an epoch) and mid logging window; the newest checkpoint is step 28.
    crashed = _run(run_dir, digits_dataset, "--inject-failure", "step=31,rank=1")
    assert crashed.returncode != 0 and not (run_dir / "summary.json").exists()
    assert ckpt.list_checkpoints(run_dir)[-1].name == "step-00000028.h5"
    resumed = _run(run_dir, digits_dataset)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and "step-00000028.h5" in resumed.stdout
    summary = _assert_same_as_reference(run_dir, reference)
    assert summary["resumed_from_step"] == 28


def test_async_checkpoints_hold_the_same_bits_as_sync_ones(
    tmp_path: Path, digits_dataset: Path, reference: Path
) -> None:
    """An async run (deferred snapshot, a fence before each optimizer step) writes what the sync reference
    wrote."""
    run_dir = tmp_path / "run"
    proc = _run(run_dir, digits_dataset, "--set", "checkpoint.async_save=true")
    assert proc.returncode == 0, proc.stderr
    _assert_same_as_reference(run_dir, reference)
    ours, theirs = ckpt.list_checkpoints(run_dir), ckpt.list_checkpoints(reference)
    assert [p.name for p in ours] == [p.name for p in theirs] and len(ours) == 3
    for a_path, b_path in zip(ours, theirs, strict=True):
        a, b = ckpt.read_checkpoint(a_path), ckpt.read_checkpoint(b_path)
        assert a.arrays.keys() == b.arrays.keys()
        for key in a.arrays:
            assert np.array_equal(a.arrays[key], b.arrays[key]), (a_path.name, key)
    blocks = json.loads((run_dir / "summary.json").read_text())["checkpoints"]
    assert all(c["async"] and c["block_s"] >= 0 for c in blocks)


def test_sigusr1_checkpoints_exits_75_and_resumes_identically(
    tmp_path: Path, digits_dataset: Path, reference: Path
) -> None:
    run_dir = tmp_path / "run"
    data = ["--set", f"data.path={json.dumps(str(digits_dataset))}"]
    cmd = [sys.executable, "-m", "hpcai", "run", "jobs/digits.toml", "--run-dir", str(run_dir), *data, *SHORT]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGUSR1)  # what a Slurm batch script passes on at the warning signal
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "stopped on a signal" in err
    stopped_at = json.loads(sorted(ckpt.list_checkpoints(run_dir))[-1].name[5:13].lstrip("0") or "0")
    assert 0 < stopped_at < 132
    resumed = _run(run_dir, digits_dataset)
    assert resumed.returncode == 0, resumed.stderr
    summary = _assert_same_as_reference(run_dir, reference)
    assert summary["resumed_from_step"] == stopped_at


def test_elastic_restart_four_ranks_to_two(tmp_path: Path, digits_dataset: Path) -> None:
    run_dir = tmp_path / "run"
    crashed = _run(run_dir, digits_dataset, "-n", "4", "--inject-failure", "step=40,rank=3")
    assert crashed.returncode != 0
    payload = ckpt.read_checkpoint(ckpt.list_checkpoints(run_dir)[-1])
    assert payload.attrs["world_size"] == 4 and payload.step == 35
    resumed = _run(run_dir, digits_dataset, "-n", "2")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["resumed_from_step"] == 35 and summary["steps"] == 132
    steps = [m[0] for m in _metrics(run_dir)]
    assert steps == sorted(set(steps)) and steps[-1] == 132  # no step logged twice, none missing at the end
    assert summary["test_accuracy"] > 0.9


def test_changed_spec_is_refused_unless_forced(tmp_path: Path, digits_dataset: Path, reference: Path) -> None:
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    refused = _run(run_dir, digits_dataset, "--set", "train.lr=0.3")
    assert refused.returncode == 2
    assert "train.lr: 0.1 -> 0.3" in refused.stderr and "--resume force" in refused.stderr
    assert "Traceback" not in refused.stderr
    never = _run(run_dir, digits_dataset, "--resume", "never")
    assert never.returncode == 2 and "holds checkpoints of an earlier run" in never.stderr
    bad = run_cli("run", "jobs/digits.toml", "--resume", str(tmp_path / "nope.h5"), "--run-dir", str(run_dir))
    assert bad.returncode == 2 and "nope.h5" in bad.stderr and "Traceback" not in bad.stderr
    forced = _run(run_dir, digits_dataset, "--set", "train.lr=0.3", "--resume", "force")
    assert forced.returncode == 0, forced.stderr


def test_inspect_lists_and_describes(reference: Path) -> None:
    listing = run_cli("inspect", str(reference), "--json", timeout=60)
    assert listing.returncode == 0, listing.stderr
    info = json.loads(listing.stdout)
    assert info["resume_from"].endswith("step-00000132.h5") and len(info["checkpoints"]) == 3
    one = run_cli("inspect", info["resume_from"], "--json", timeout=60)
    desc = json.loads(one.stdout)
    assert desc["step"] == 132 and desc["world_size"] == 2 and desc["checksums"] == "ok"
    assert "model/1.weight" in desc["tensors"] and "rng/rank_1" in desc["tensors"]
    missing = run_cli("inspect", str(reference / "nothing.h5"), timeout=60)
    assert missing.returncode == 2 and "no such checkpoint" in missing.stderr


def test_a_flipped_scheduler_bit_is_skipped_for_the_previous_checkpoint(
    tmp_path: Path, digits_dataset: Path, reference: Path
) -> None:
    """One bit in the stored LR-scheduler state (0.1 -> 0.9: 9x the learning rate) used to pass as
    "checksums ok"; now the attribute checksum fails, the previous checkpoint is used and the result is the
    reference's."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    newest = ckpt.list_checkpoints(run_dir)[-1]
    data = bytearray(newest.read_bytes())
    at = data.find(b'"base_lrs": [0.1]')
    data[at + 15] ^= 0x08
    newest.write_bytes(bytes(data))
    resumed = _run(run_dir, digits_dataset)
    assert resumed.returncode == 0, resumed.stderr
    assert (
        "skipping checkpoint" in resumed.stdout + resumed.stderr
        and "CRC-32C" in resumed.stdout + resumed.stderr
    )
    summary = _assert_same_as_reference(run_dir, reference)
    assert summary["resumed_from_step"] == 126
