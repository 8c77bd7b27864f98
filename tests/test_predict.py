"""`hpcai predict`: one complete HDF5 file, every row exactly once, the same answers at any rank count."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hpcai import checkpoint as ckpt
from hpcai.cli import main as cli_main
from hpcai.data.etl import build_dataset
from hpcai.data.shards import ShardedDataset
from hpcai.launch import find_mpiexec
from hpcai.models import build_model
from hpcai.spec import load_spec
from hpcai.train import make_optimizer
from tests.conftest import ROOT, cli_env, run_cli


def make_run(run_dir: Path, data: Path, step: int = 10, seed: int = 0) -> Path:
    """A run directory as `hpcai run` leaves it (job.toml, a checkpoint at ``step``), made in-process in a
    second: ``step`` SGD steps on one process from ``seed``, saved with the trainer's own checkpoint code."""
    spec = load_spec(None, [f"data.path={json.dumps(str(data))}"])
    run_dir.mkdir(exist_ok=True)
    (run_dir / "job.toml").write_text(spec.to_toml())
    torch.manual_seed(seed)
    ds = ShardedDataset(data)
    model = build_model(spec.model, ds.sample_shape, ds.num_classes)
    opt = make_optimizer(model, spec.train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _s: 1.0)
    x, y = ds.splits["train"].read_range(0, 640)
    for i in range(step):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(
            model(torch.from_numpy(x[i % 10 :: 10])), torch.from_numpy(y[i % 10 :: 10])
        ).backward()
        opt.step()
    ds.close()
    payload = ckpt.pack_state(model, opt, sched)
    payload.attrs.update(
        step=step, epoch=0, step_in_epoch=step, world_size=1, spec=json.dumps(spec.to_dict())
    )
    ckpt.write_checkpoint(ckpt.checkpoint_path(run_dir, step), payload)
    return run_dir


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, digits_dataset: Path) -> Path:
    return make_run(tmp_path_factory.mktemp("predict") / "run", digits_dataset)


def reference(run_dir: Path, data: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits, predictions and labels of the whole test split in this one process, no hpcai.predict code."""
    spec = load_spec(run_dir / "job.toml")
    ds = ShardedDataset(data)
    model = build_model(spec.model, ds.sample_shape, ds.num_classes)
    ckpt.unpack_model(ckpt.read_checkpoint(ckpt.list_checkpoints(run_dir)[-1]), model)
    x, y = ds.splits["test"].read_range(0, len(ds.splits["test"]))
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(x)).numpy()
    ds.close()
    return logits, logits.argmax(1), y


def check_output(out: Path, run_dir: Path, data: Path, ranks: int) -> h5py.File:
    logits, preds, labels = reference(run_dir, data)
    f = h5py.File(out, "r")
    assert np.array_equal(f["sample_ids"][:], np.arange(len(labels)))  # every row exactly once, in order
    assert np.array_equal(f["predictions"][:], preds)
    assert np.array_equal(f["labels"][:], labels)
    assert f.attrs["ranks"] == ranks and f.attrs["rows"] == len(labels)
    assert f.attrs["accuracy"] == pytest.approx(float((preds == labels).mean()))
    if "logits" in f:
        np.testing.assert_allclose(f["logits"][:], logits, rtol=1e-5, atol=1e-5)
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temporary left
    return f


@pytest.mark.parametrize("ranks", [2, 3])
def test_predict_on_several_ranks_writes_every_row_once(
    tmp_path: Path, trained_run: Path, digits_dataset: Path, ranks: int
) -> None:
    """-n 3 through `hpcai predict` (checks, then its mpiexec relaunch); 2 ranks started by mpiexec itself."""
    out = tmp_path / "preds.h5"
    args = ["predict", str(trained_run), "--data", str(digits_dataset), "--out", str(out), "--logits"]
    if ranks == 3:
        proc = run_cli(*args, "-n", "3")
    else:
        cmd = [find_mpiexec(), "-n", "2", sys.executable, "-m", "hpcai", *args, "-n", "2"]
        proc = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "samples/s" in proc.stdout
    with check_output(out, trained_run, digits_dataset, ranks) as f:
        assert f["logits"].shape == (f.attrs["rows"], 10)


def test_predict_in_one_process_with_probabilities(
    tmp_path: Path, trained_run: Path, digits_dataset: Path
) -> None:
    out = tmp_path / "one.h5"
    args = ["predict", str(trained_run), "--data", str(digits_dataset), "--out", str(out), "--batch", "50"]
    assert cli_main([*args, "--probabilities"]) == 0
    with check_output(out, trained_run, digits_dataset, 1) as f:
        assert "logits" not in f  # only what was asked for
        np.testing.assert_allclose(f["probabilities"][:].sum(1), 1.0, rtol=1e-5)
    assert cli_main([*args, "--overwrite", "--split", "train"]) == 0  # replaces it atomically
    with h5py.File(out) as f:
        assert f.attrs["split"] == "train" and len(f["sample_ids"]) == 1438


def test_predict_with_a_unicode_data_path(tmp_path: Path, trained_run: Path, digits_dataset: Path) -> None:
    """--data is passed into the spec as a TOML string that round-trips any Unicode (was json.dumps: a
    non-BMP character became a surrogate pair TOML rejects, exit 2)."""
    import shutil

    data = tmp_path / "dätä🚀"
    shutil.copytree(digits_dataset, data)
    out = tmp_path / "ü.h5"
    assert cli_main(["predict", str(trained_run), "--data", str(data), "--out", str(out)]) == 0
    with h5py.File(out) as f:
        assert len(f["sample_ids"]) == 359


def test_predict_bad_input_is_one_line_exit_2(
    tmp_path: Path, trained_run: Path, digits_dataset: Path, capsys: pytest.CaptureFixture
) -> None:
    def fails(*argv: str, match: str) -> None:
        assert cli_main(["predict", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err and "Traceback" not in err, err

    out = str(tmp_path / "p.h5")
    data = ["--data", str(digits_dataset), "--out", out]
    no_ckpt = tmp_path / "fresh"
    no_ckpt.mkdir()
    shutil.copy(trained_run / "job.toml", no_ckpt / "job.toml")
    fails(str(no_ckpt), *data, match="no valid checkpoint")
    ckpt.checkpoint_dir(no_ckpt).mkdir()
    ckpt.checkpoint_path(no_ckpt, 5).write_bytes(b"not hdf5")  # the only one, unreadable: say why
    fails(str(no_ckpt), *data, match="no valid checkpoint to predict with (newest: ")
    fails(str(tmp_path / "nowhere"), *data, match="job.toml missing")
    fails(str(trained_run), *data, "--split", "val", match="no split 'val'")
    images = build_dataset("synthetic-images:n=20,size=8", tmp_path / "img", 1, log=lambda *_: None)
    fails(str(trained_run), "--data", str(images), "--out", out, match="do not fit the model")
    Path(out).write_text("precious")
    fails(str(trained_run), *data, match="already exists")
    assert Path(out).read_text() == "precious"
