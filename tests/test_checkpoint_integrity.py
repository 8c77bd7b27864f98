"""Checkpoint integrity: attributes and the array list under a checksum, files that pass their checksums but
cannot be loaded, temporary files that a planted symlink cannot redirect, stale temporaries, a full disk."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from hpcai import checkpoint as ckpt
from hpcai import fsio
from hpcai.cli import main as cli_main
from tests.conftest import ROOT, cli_env, small_tmpfs

# ------------------------------------------------------------------------------------ helpers


def _model_and_opt():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(16, 4)).sum().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def _payload(step: int, **extra_arrays: np.ndarray) -> ckpt.Payload:
    model, opt, sched = _model_and_opt()
    p = ckpt.pack_state(model, opt, sched)
    spec = {"train": {"batch_size": 64, "lr": 0.1}, "job": {"name": "t"}}
    p.attrs.update(step=step, epoch=0, step_in_epoch=step, world_size=1, spec=json.dumps(spec))
    p.arrays["rng/rank_0"] = ckpt.pack_rng()
    p.arrays["train/window_losses"] = np.zeros(0, np.float64)
    p.arrays.update(extra_arrays)
    return p


def _write(run_dir: Path, step: int, **extra_arrays: np.ndarray) -> Path:
    path = ckpt.checkpoint_path(run_dir, step)
    ckpt.write_checkpoint(path, _payload(step, **extra_arrays))
    return path


def _flip_bytes(path: Path, pattern: bytes, index: int, bit: int) -> None:
    """Flip one bit where ``pattern`` occurs (once) in the file: what a storage fault does."""
    data = bytearray(path.read_bytes())
    at = data.find(pattern)
    assert at >= 0 and data.find(pattern, at + 1) < 0, pattern
    data[at + index] ^= 1 << bit
    path.write_bytes(bytes(data))


def _dims_offset(path: Path, name: str) -> tuple[int, int]:
    """File offset of a dataset's stored dimensions (its dataspace message; version-1 object header, as h5py
    writes by default) and its rank. The maximum dimensions follow them."""
    with h5py.File(path, "r") as f:
        addr = h5py.h5o.get_info(f[name].id).addr
    data = path.read_bytes()
    assert data[addr] == 1, "expected a version-1 object header"
    nmsgs = struct.unpack_from("<H", data, addr + 2)[0]
    at = addr + 16
    for _ in range(nmsgs):
        kind, size = struct.unpack_from("<HH", data, at)
        if kind == 1:  # dataspace: version, rank, flags, reserved (5 bytes), then the dimensions
            assert data[at + 8] == 1
            return at + 16, data[at + 9]
        at += 8 + size
    raise AssertionError("no dataspace message")


def _set_dim(path: Path, name: str, axis: int, value: int, also_max: bool = True) -> None:
    at, rank = _dims_offset(path, name)
    data = bytearray(path.read_bytes())
    data[at + 8 * axis : at + 8 * axis + 8] = struct.pack("<Q", value)
    if also_max:
        data[at + 8 * (rank + axis) : at + 8 * (rank + axis) + 8] = struct.pack("<Q", value)
    path.write_bytes(bytes(data))


def _as_version_1(path: Path) -> None:
    """Make a file look as hpcai 0.1 wrote it: no checksum over the attributes."""
    with h5py.File(path, "r+") as f:
        del f.attrs[ckpt.META_CRC]
        f.attrs["version"] = 1


def _inspect(capsys: pytest.CaptureFixture, target: Path) -> tuple[int, str, str]:
    rc = cli_main(["inspect", str(target)])
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------------------ 1: attributes


def _edit_scheduler_bit(path: Path) -> None:
    _flip_bytes(path, b'"base_lrs": [0.1]', 15, 3)  # 0.1 -> 0.9: the 9x learning rate


def _edit_step(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        f.attrs["step"] = 3


def _edit_step_in_epoch(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        f.attrs["step_in_epoch"] = 0


def _remove_dataset(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        del f["optimizer/state/0/momentum_buffer"]


def _rename_dataset(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        f.move("rng/rank_0", "rng/rank_1")


def _add_attribute(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        f.attrs["pipeline_bounds"] = "[0, 2]"


@pytest.mark.parametrize(
    "edit",
    [_edit_scheduler_bit, _edit_step, _edit_step_in_epoch, _remove_dataset, _rename_dataset, _add_attribute],
)
def test_edited_attributes_and_array_list_are_caught(
    tmp_path: Path, capsys: pytest.CaptureFixture, edit
) -> None:
    older = _write(tmp_path, 10)
    newest = _write(tmp_path, 20)
    edit(newest)
    with pytest.raises(ckpt.CheckpointError, match="attributes or list of arrays fail"):
        ckpt.read_checkpoint(newest)
    warnings: list[str] = []
    path, payload = ckpt.find_resumable(tmp_path, warn=warnings.append)
    assert path == older and payload.step == 10 and "step-00000020.h5" in warnings[0]
    rc, out, err = _inspect(capsys, newest)
    assert rc == 2 and "checksums: ok" not in out and err.count("\n") == 1 and "step-00000020.h5" in err


def test_every_kind_of_array_and_attribute_passes_its_own_check(tmp_path: Path) -> None:
    """The writer computes the checksum from what it wrote, the reader from what the file holds: they agree
    for every dtype, 0-dim and empty arrays, nested groups, large (O_DIRECT) arrays and attribute types."""
    big = ckpt.aligned_empty((300_000,), np.float32)
    big[:] = 2.0
    arrays = {
        "a/b/c/flags": np.array([True, False]),
        "bits": np.arange(6, dtype=np.int16).reshape(2, 3),
        "scalar": np.array(3.5),
        "empty": np.zeros((0, 4), np.float64),
        "bytes": np.arange(7, dtype=np.uint8),
        "complex": np.array([1 + 2j], np.complex64),
        "big": big,
    }
    attrs = dict(step=1, epoch=0, step_in_epoch=1, world_size=1, spec="{}", torch_dtypes="{}")
    attrs.update(loss=float("nan"), flag=True, name="rocket\U0001f680", seed=np.uint32(7), neg=-2)
    path = tmp_path / "c.h5"
    ckpt.write_checkpoint(path, ckpt.Payload(arrays=arrays, attrs=attrs))
    p = ckpt.read_checkpoint(path)
    assert p.attrs_checked and p.attrs["name"] == "rocket\U0001f680" and p.attrs["seed"] == 7
    for k, a in arrays.items():
        assert p.arrays[k].dtype == a.dtype and np.array_equal(p.arrays[k], a), k


def test_the_attribute_checksum_itself_may_not_go_missing(tmp_path: Path) -> None:
    path = _write(tmp_path, 10)
    with h5py.File(path, "r+") as f:
        del f.attrs[ckpt.META_CRC]
    with pytest.raises(ckpt.CheckpointError, match="meta_crc32c.*missing"):
        ckpt.read_checkpoint(path)


def test_version_1_files_still_load_and_inspect_says_what_is_unchecked(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = _write(tmp_path, 10)
    _as_version_1(path)
    p = ckpt.read_checkpoint(path)
    assert p.step == 10 and not p.attrs_checked
    assert ckpt.read_checkpoint(_write(tmp_path, 20)).attrs_checked
    rc, out, _ = _inspect(capsys, path)
    assert rc == 0 and "checksums: ok" in out and "format version 1" in out
    rc, out, _ = _inspect(capsys, tmp_path)
    assert rc == 0 and "step-00000010.h5" in out and "<- resume" in out


# ------------------------------------------------------------------------------------ 2: passes, cannot load


@pytest.mark.parametrize("version", [1, 2])
def test_a_dataset_declaring_2_to_the_40_floats_is_refused_before_allocating(tmp_path: Path, version) -> None:
    older = _write(tmp_path, 10)
    newest = _write(tmp_path, 20)
    if version == 1:
        _as_version_1(newest)
    _set_dim(newest, "train/window_losses", 0, 1 << 40)  # empty: no storage, so HDF5 does not object
    with pytest.raises(ckpt.CheckpointError, match="train/window_losses|list of arrays"):
        ckpt.read_checkpoint(newest)
    assert ckpt.find_resumable(tmp_path, warn=lambda _m: None)[0] == older


def test_a_stored_dimension_larger_than_the_data_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, 10, extra=np.arange(777, dtype=np.float32))
    _as_version_1(path)
    _set_dim(path, "extra", 0, 778)  # one element more than the file holds
    with pytest.raises(ckpt.CheckpointError, match=r"/extra declares 3112 bytes, the file holds 3108"):
        ckpt.read_checkpoint(path)


def test_a_flipped_dimension_is_one_line_in_inspect(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _write(tmp_path, 10, extra=np.arange(777, dtype=np.float32))
    _set_dim(
        path, "extra", 0, 777 ^ 1 << 12, also_max=False
    )  # larger than its maximum: HDF5 will not open it
    rc, out, err = _inspect(capsys, path)
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err and "/extra" in err, err
    rc, out, err = _inspect(capsys, tmp_path)
    assert rc == 0 and "FAILED" in out and "no valid checkpoint" in out


@pytest.mark.parametrize("version", [1, 2])
def test_garbled_json_attributes_name_the_attribute(tmp_path: Path, version) -> None:
    older = _write(tmp_path, 10)
    newest = _write(tmp_path, 20)
    if version == 1:
        _as_version_1(newest)
    _flip_bytes(newest, b'{"train": {"batch_size"', 1, 0)  # '"' -> '#'
    match = "attribute 'spec': not valid JSON" if version == 1 else "list of arrays fail"
    with pytest.raises(ckpt.CheckpointError, match=match):
        ckpt.read_checkpoint(newest)
    assert ckpt.find_resumable(tmp_path, warn=lambda _m: None)[0] == older


@pytest.mark.parametrize(
    "key, value, why",
    [
        ("scheduler", "[1, 2]", "attribute 'scheduler': expected a JSON object"),
        ("step", -1, "attribute 'step': must be an integer >= 0"),
        ("world_size", 0, "attribute 'world_size': must be an integer >= 1"),
        ("last_loss", "low", "attribute 'last_loss': must be a number"),
        ("torch_dtypes", '{"model/0.weight": "float99"}', "attribute 'torch_dtypes': 'float99'"),
    ],
)
def test_attribute_values_are_validated_on_read(tmp_path: Path, key, value, why) -> None:
    path = _write(tmp_path, 10)
    _as_version_1(path)
    with h5py.File(path, "r+") as f:
        f.attrs[key] = value
    with pytest.raises(ckpt.CheckpointError, match=why):
        ckpt.read_checkpoint(path)


def test_check_fits_model_names_the_tensor_and_unpack_changes_nothing_on_a_misfit(tmp_path: Path) -> None:
    p = ckpt.read_checkpoint(_write(tmp_path, 10))
    model, opt, sched = _model_and_opt()
    ckpt.check_fits_model(p, model, opt)  # its own state fits
    other = nn.Sequential(nn.Linear(4, 9), nn.ReLU(), nn.Linear(9, 2))
    with pytest.raises(
        ckpt.CheckpointError, match=r"model/0.weight has shape \(8, 4\), the model's is \(9, 4\)"
    ):
        ckpt.check_fits_model(p, other)
    bad = ckpt.Payload(arrays=dict(p.arrays), attrs=dict(p.attrs))
    bad.arrays["optimizer/state/2/momentum_buffer"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ckpt.CheckpointError, match="optimizer/state/2/momentum_buffer has shape"):
        ckpt.check_fits_model(bad, model, opt)
    before = [t.clone() for t in model.state_dict().values()]
    fresh, fresh_opt, fresh_sched = _model_and_opt()
    with torch.no_grad():
        fresh[0].weight.add_(1.0)
    before = [t.clone() for t in fresh.state_dict().values()]
    with pytest.raises(ckpt.CheckpointError):
        ckpt.unpack_state(bad, fresh, fresh_opt, fresh_sched)
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.state_dict().values(), strict=True))
    wrong_dtype = ckpt.Payload(arrays=dict(p.arrays), attrs=dict(p.attrs))
    wrong_dtype.arrays["model/0.bias"] = p.arrays["model/0.bias"].astype(np.float64)
    with pytest.raises(
        ckpt.CheckpointError, match="model/0.bias is stored as float64, its record says float32"
    ):
        ckpt.unpack_model(wrong_dtype, model)


def test_a_short_rng_state_is_a_checkpoint_error() -> None:
    blob = ckpt.pack_rng()
    with pytest.raises(ckpt.CheckpointError, match="checkpoint RNG state"):
        ckpt.unpack_rng(blob[:100])
    ckpt.unpack_rng(blob)


def test_run_resume_path_and_predict_report_an_unloadable_checkpoint_in_one_line(
    tmp_path: Path, digits_dataset: Path, capsys: pytest.CaptureFixture
) -> None:
    from tests.test_predict import make_run

    run = make_run(tmp_path / "run", digits_dataset, step=2)
    path = ckpt.checkpoint_path(run, 2)
    _as_version_1(path)
    with h5py.File(path, "r+") as f:
        f.attrs["spec"] = "{#" + f.attrs["spec"][2:]  # a garbled spec
    assert cli_main(["run", "jobs/digits.toml", "--resume", str(path), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "attribute 'spec': not valid JSON" in err and str(path) in err, err
    out = tmp_path / "p.h5"
    assert cli_main(["predict", str(run), "--data", str(digits_dataset), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no valid checkpoint" in err and not out.exists(), err


def test_a_fifo_or_a_dangling_link_is_refused_not_waited_for(tmp_path: Path, capsys) -> None:
    fifo = tmp_path / "step.h5"
    os.mkfifo(fifo)
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint file"):
        ckpt.read_checkpoint(fifo)  # opening a FIFO for reading would wait for a writer forever
    older = _write(tmp_path, 10)
    ckpt.checkpoint_path(tmp_path, 20).symlink_to(tmp_path / "gone.h5")
    assert ckpt.find_resumable(tmp_path, warn=lambda _m: None)[0] == older
    rc, out, _ = _inspect(capsys, tmp_path)
    assert rc == 0 and "step-00000020.h5" in out and "FAILED" in out and "<- resume" in out


# ------------------------------------------------------------------------------------ 3: temporary files


def test_planted_symlinks_at_temporary_names_are_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    d = ckpt.checkpoint_dir(tmp_path)
    d.mkdir()
    import socket

    host = socket.gethostname().split(".")[0]
    (d / ".step-00000300.h5.tmp").symlink_to(victim)  # the name hpcai 0.1 used
    for token in ("00000000", "ffffffff", "deadbeef"):  # guessed names of the new pattern
        (d / f".step-00000300.h5.tmp-{host}-{os.getpid()}-{token}").symlink_to(victim)
    ckpt.write_checkpoint(ckpt.checkpoint_path(tmp_path, 300), _payload(300))
    assert victim.read_text() == "precious"
    assert ckpt.read_checkpoint(ckpt.checkpoint_path(tmp_path, 300)).step == 300


def test_a_temporary_name_already_taken_is_an_error_not_an_overwrite(tmp_path: Path, monkeypatch) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    d = ckpt.checkpoint_dir(tmp_path)
    d.mkdir()
    taken = d / ".step-00000001.h5.tmp-h-1-00000000"
    taken.symlink_to(victim)
    monkeypatch.setattr(fsio, "temp_name", lambda final: taken)  # as if someone guessed the token
    with pytest.raises(FileExistsError):
        ckpt.write_checkpoint(ckpt.checkpoint_path(tmp_path, 1), _payload(1))
    assert victim.read_text() == "precious" and taken.is_symlink()  # not ours: left alone
    assert not ckpt.checkpoint_path(tmp_path, 1).exists()


def test_the_o_direct_reopen_cannot_be_redirected(tmp_path: Path, monkeypatch) -> None:
    """Someone swaps the temporary file for a symlink between HDF5's layout and the O_DIRECT writes of the
    large arrays: the writes do not follow it and nothing is committed."""
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"\0" * (4 << 20))
    real_open = os.open

    def swapping_open(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0) and ".tmp-" in str(path):
            os.rename(path, str(path) + ".moved")
            os.symlink(victim, path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", swapping_open)
    big = ckpt.aligned_empty((1 << 20,), np.float32)
    big[:] = 7.0
    with pytest.raises(ckpt.CheckpointError, match="replaced while being written"):
        ckpt.write_checkpoint(ckpt.checkpoint_path(tmp_path, 5), _payload(5, big=big))
    assert victim.read_bytes() == b"\0" * (4 << 20)
    assert not ckpt.checkpoint_path(tmp_path, 5).exists()


# ------------------------------------------------------------------------------------ 4: stale temporaries


def test_remove_stale_temporaries_cleans_old_and_new_style_only(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    kept = _write(tmp_path, 10)
    d = ckpt.checkpoint_dir(tmp_path)
    old = d / ".step-00000020.h5.tmp"
    old.write_bytes(b"partial")
    new = d / ".step-00000030.h5.tmp-host-123-abcdef01"
    new.write_bytes(b"partial")
    link = d / ".step-00000040.h5.tmp"
    link.symlink_to(victim)
    other = d / "notes.txt"
    other.write_text("mine")
    removed = ckpt.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted([old.name, new.name, link.name])
    assert sorted(p.name for p in d.iterdir()) == sorted([kept.name, other.name])
    assert victim.read_text() == "precious"
    assert ckpt.remove_stale_temporaries(tmp_path / "nowhere") == []


# ------------------------------------------------------------------------------------ 5: full disk


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 1 MiB tmpfs under tmp_path."""
    with small_tmpfs(tmp_path / "fs", "1m") as d:
        yield d


def test_full_disk_is_one_line_leaves_no_temporary_and_keeps_older_checkpoints(small_fs: Path) -> None:
    writer = ckpt.CheckpointWriter(small_fs, keep=1, async_save=False, log=lambda *_: None)
    writer.save(_payload(10))
    first = ckpt.checkpoint_path(small_fs, 10).read_bytes()
    with pytest.raises(fsio.NoSpaceError) as e:
        writer.save(_payload(20, big=np.ones(400_000, np.float32)))  # 1.6 MB: more than the disk
    assert str(e.value) == f"{ckpt.checkpoint_path(small_fs, 20)}: no space left on device"
    assert [p.name for p in ckpt.checkpoint_dir(small_fs).iterdir()] == ["step-00000010.h5"]
    assert ckpt.checkpoint_path(small_fs, 10).read_bytes() == first  # not pruned, not touched


def test_hdf5_never_meets_a_full_disk_mid_write(small_fs: Path) -> None:
    """With the disk nearly full, each fill level leaving a little less room: every write commits or fails
    cleanly with NoSpaceError, and the process exits normally (HDF5 used to crash at exit, status 139, once
    a metadata write had failed)."""
    script = textwrap.dedent(
        f"""
        import numpy as np
        from pathlib import Path
        from hpcai import checkpoint as ckpt, fsio
        d = Path({str(small_fs)!r})
        arrays = {{f"model/w{{i}}": np.ones(10_000, np.float32) for i in range(8)}}
        attrs = dict(step=1, epoch=0, step_in_epoch=1, world_size=1, spec="{{}}", torch_dtypes="{{}}")
        outcomes = set()
        for kib in range(640, 768, 16):
            for p in d.iterdir():
                p.unlink() if p.is_file() else [q.unlink() for q in p.iterdir()]
            (d / "fill").write_bytes(b"x" * (kib << 10))
            try:
                ckpt.write_checkpoint(d / "checkpoints/step-00000001.h5", ckpt.Payload(dict(arrays), attrs))
                outcomes.add("ok")
            except fsio.NoSpaceError:
                outcomes.add("full")
            assert not [p for p in (d / "checkpoints").iterdir() if p.name.startswith(".")]
        print(sorted(outcomes))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "['full', 'ok']"  # the fill levels span both outcomes
