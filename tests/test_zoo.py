"""The model zoo (mlp, cnn, resnet, transformer), its generated data sources and the example jobs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hpcai.data.etl import build_dataset
from hpcai.data.shards import ShardedDataset
from hpcai.data.synthetic import parse_source, synthetic_tokens, text_windows
from hpcai.errors import DatasetError, SpecError
from hpcai.launch import find_mpiexec
from hpcai.models import build_model, init_block, materialize, model_skeleton
from hpcai.spec import ModelSection, load_spec
from hpcai.train import evaluate
from tests.conftest import ROOT, cli_env
from tests.test_run import check_run_dir


def _model(name: str, shape: tuple[int, ...], classes: int, **kw) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelSection(name=name, **kw), shape, classes)


@pytest.mark.parametrize(
    "name, shape, kw, out",
    [
        ("mlp", (1, 8, 8), {}, (4, 10)),
        ("cnn", (3, 32, 32), {}, (4, 10)),
        ("resnet", (3, 16, 16), {"channels": [8, 16], "blocks": 1}, (4, 10)),
        ("resnet", (3, 64, 64), {"channels": [8], "blocks": 1}, (4, 10)),  # the ImageNet stem
        ("transformer", (12,), {"d_model": 16, "layers": 2, "heads": 2}, (4, 10, 12)),  # (B, V, T)
    ],
)
def test_zoo_models_are_sequential_with_the_right_output(name, shape, kw, out) -> None:
    model = _model(name, shape, 10, **kw)
    assert isinstance(model, nn.Sequential) and len(model) >= 3  # a pipeline can cut it into stages
    x = torch.randint(0, 10, (4, *shape)) if name == "transformer" else torch.randn(4, *shape)
    logits = model(x)
    assert tuple(logits.shape) == out
    # The loss the strategy uses works as is: targets (B,) or (B, T).
    y = torch.randint(0, 10, out[:1] + out[2:])
    nn.CrossEntropyLoss()(logits, y).backward()


ZOO = [
    ("mlp", (1, 8, 8), {"hidden": [16, 16, 16]}),
    ("cnn", (3, 16, 16), {}),
    ("resnet", (3, 16, 16), {"channels": [8, 16], "blocks": 1}),
    ("transformer", (12,), {"d_model": 16, "layers": 2, "heads": 2}),
]


@pytest.mark.parametrize("name, shape, kw", ZOO)
def test_a_stage_built_alone_holds_what_the_whole_model_holds_there(name, shape, kw) -> None:
    """A pipeline rank materialises only its blocks of the meta skeleton; they equal the whole model's."""
    cfg = ModelSection(name=name, **kw)
    whole = build_model(cfg, shape, 10, seed=7)
    skeleton = model_skeleton(cfg, shape, 10)
    assert all(t.is_meta for t in [*skeleton.parameters(), *skeleton.buffers()])  # no storage at all
    lo, hi = 1, len(skeleton) - 1  # a middle stage
    materialize(skeleton, range(lo, hi), seed=7)
    built = {k: v for k, v in skeleton.state_dict().items() if not v.is_meta}
    expected = {k: v for k, v in whole.state_dict().items() if lo <= int(k.split(".")[0]) < hi}
    assert built.keys() == expected.keys() and built
    assert all(torch.equal(built[k], expected[k]) for k in built)
    assert all(t.is_meta for i in (0, len(skeleton) - 1) for t in skeleton[i].parameters())  # never built


def test_block_initialisation_depends_on_the_seed_and_the_block_not_the_global_rng() -> None:
    cfg = ModelSection(name="mlp", hidden=[16, 16])
    torch.manual_seed(1)
    a = build_model(cfg, (1, 8, 8), 10, seed=3)
    after = torch.rand(1)  # building left the global generator where the caller put it
    torch.manual_seed(2)
    b = build_model(cfg, (1, 8, 8), 10, seed=3)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(1), after)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    c = build_model(cfg, (1, 8, 8), 10, seed=4)
    assert not torch.equal(a[1].weight, c[1].weight)
    assert not torch.equal(a[1].weight[:, :16], a[3].weight[:, :16])  # blocks draw from their own seeds
    # Same distribution as the layer's own constructor: kaiming-uniform bound 1/sqrt(fan_in) for the bias.
    assert a[1].bias.abs().max() <= 1 / 64**0.5


def test_a_module_holding_parameters_without_reset_parameters_is_refused() -> None:
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

    with pytest.raises(TypeError, match="Scale holds parameters but has no reset_parameters"):
        init_block(nn.Sequential(nn.Linear(3, 3), Scale()), seed=0)


def test_cnn_pools_only_images_larger_than_8x8() -> None:
    """Digits (8x8) get exactly the pre-zoo cnn; 32x32 images are pooled after each conv."""
    assert not any(isinstance(m, nn.MaxPool2d) for m in _model("cnn", (1, 8, 8), 10))
    assert sum(isinstance(m, nn.MaxPool2d) for m in _model("cnn", (3, 32, 32), 10)) == 2


def test_transformer_is_causal() -> None:
    """Changing the token at position t changes no logits before t."""
    model = _model("transformer", (10,), 7, d_model=16, layers=2, heads=4).eval()
    x = torch.randint(0, 7, (2, 10))
    x2 = x.clone()
    x2[:, 6] = (x2[:, 6] + 1) % 7
    with torch.no_grad():
        a, b = model(x), model(x2)
    assert torch.equal(a[:, :, :6], b[:, :, :6])
    assert not torch.equal(a[:, :, 6:], b[:, :, 6:])


def test_model_shape_errors_name_the_key() -> None:
    with pytest.raises(SpecError, match="transformer needs"):
        _model("transformer", (1, 8, 8), 10)
    with pytest.raises(SpecError, match="resnet needs"):
        _model("resnet", (64,), 10)


def test_spec_checks_zoo_keys_and_generated_sources() -> None:
    with pytest.raises(SpecError, match="model.heads"):
        load_spec(None, ["model.d_model=30", "model.heads=4"])
    with pytest.raises(SpecError, match="model.blocks"):
        load_spec(None, ["model.blocks=0"])
    with pytest.raises(SpecError, match="data.source.*bad option"):
        load_spec(None, ["data.source=synthetic-images:colour=3"])
    spec = load_spec(None, ["data.source=synthetic-tokens:n=64,seq=8", "model.name=transformer"])
    assert spec.model.name == "transformer"


def test_generated_sources(tmp_path: Path) -> None:
    x, y = synthetic_tokens(n=5, seq=6, vocab=9, p=0.5, seed=1)
    assert x.shape == y.shape == (5, 6) and x.dtype == np.int64
    assert np.array_equal(x[:, 1:], y[:, :-1])  # y is x shifted by one token
    text = tmp_path / "t.txt"
    text.write_bytes(bytes(range(41)))
    tx, ty = text_windows(text, 8)
    assert tx.shape == (5, 8) and tx[1, 0] == 8 and np.array_equal(ty[0], np.arange(1, 9))
    assert parse_source("synthetic-images:n=3,noise=0.5")[2]["noise"] == 0.5
    for bad in ("synthetic-images:n=0", "synthetic-tokens:vocab=x", "synthetic-foo", "synthetic-tokens:p=2"):
        with pytest.raises(DatasetError):
            parse_source(bad)


def test_token_dataset_and_evaluate_counts_target_elements(tmp_path: Path) -> None:
    """y is stored (N, T); evaluate() divides by the number of tokens, not of samples."""
    out = build_dataset("synthetic-tokens:n=40,seq=8,vocab=5,p=1.0", tmp_path / "tok", 2, log=lambda *_: None)
    ds = ShardedDataset(out)
    assert ds.sample_shape == (8,) and ds.num_classes == 5 and ds.manifest["y_shape"] == [8]
    split = ds.splits["test"]
    x, y = split.read(np.arange(len(split)))
    assert y.shape == (len(split), 8)
    # p=1: every next token is successor[token]; a model that knows the table scores exactly 1.0.
    successor = np.zeros(5, np.int64)
    successor[x[:, :].reshape(-1)] = y.reshape(-1)
    table = nn.Embedding(5, 5)
    table.weight.data = torch.eye(5)[torch.from_numpy(successor)]

    class Oracle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = table

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.table(tokens).transpose(1, 2)  # (B, V, T)

    class One:  # the strategy of a single rank
        world_size = 1

        def sum(self, v: np.ndarray) -> np.ndarray:
            return v

    assert evaluate(Oracle(), split, One(), 0) == 1.0
    ds.close()


def test_zoo_jobs_train_on_two_ranks(tmp_path: Path) -> None:
    """Each example job, shrunk (tiny generated data, 3 steps), trains with real mpiexec on 2 ranks."""
    cmd = [
        find_mpiexec(),
        "-n",
        "2",
        sys.executable,
        "-m",
        "mpi4py",
        str(ROOT / "tests/mpi_scripts/zoo_train.py"),
    ]
    proc = subprocess.run(
        [*cmd, str(tmp_path)], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    for job in ("cnn_synthetic", "transformer_tokens", "resnet_synthetic"):
        summary = check_run_dir(tmp_path / job, 2)  # replicas bit-identical after training
        assert results[job]["steps"] == summary["steps"] == 3
        assert 0.0 <= summary["test_accuracy"] <= 1.0


def test_example_jobs_are_valid() -> None:
    for job in ("cnn_synthetic", "transformer_tokens", "resnet_synthetic"):
        spec = load_spec(ROOT / "jobs" / f"{job}.toml")
        assert spec.job.ranks == 2 and spec.train.eval_every == 1


def test_gpu_hardware_script_runs_on_cpu(tmp_path: Path) -> None:
    """scripts/gpu_hardware_bench.py (what scripts/gpu_check.sh runs on the GPU machine), shrunk, CPU only."""
    out = tmp_path / "hw.json"
    cmd = [sys.executable, str(ROOT / "scripts/gpu_hardware_bench.py"), "--devices", "cpu", "--tiny"]
    cmd += ["--models", "mlp,transformer", "--cpu-seconds", "0", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    report = json.loads(out.read_text())
    for name in ("mlp", "transformer"):
        row = report["results"][name]
        assert row["cpu_fp32"]["samples_per_s"] > 0 and row["cpu_fp32"]["steps"] >= 3
        assert row["cuda_tf32_vs_cpu"] is None  # no GPU measured
