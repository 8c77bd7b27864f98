"""`hpcai bench bubble` and its fixed-cost stages: gradients pass the delays untouched; one tiny real run.

The bench's numbers are timings, so no test judges them; these check that the fixed-cost model is the same
model as its plain layers (the delays change time only), that a run reports the formula it is compared with
and a bubble that is a fraction, and that bad arguments are one line and exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from hpcai.bench.fixed_cost import FixedCost, make_model
from tests.conftest import run_cli


def test_fixed_cost_blocks_change_time_not_gradients() -> None:
    torch.manual_seed(0)
    model = make_model((8, 8), 10, blocks=2, width=16, us_per_sample=1.0, how="spin")
    kinds = [type(m) for m in model]
    assert kinds == [nn.Flatten, nn.Linear, FixedCost, FixedCost, nn.Linear]
    plain = nn.Sequential(
        nn.Flatten(),
        model[1],
        nn.Sequential(model[2].linear, nn.ReLU()),
        nn.Sequential(model[3].linear, nn.ReLU()),
        model[4],
    )
    x, y = torch.randn(6, 8, 8), torch.randint(0, 10, (6,))
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    plain_loss = nn.functional.cross_entropy(plain(x), y)
    plain_grads = torch.autograd.grad(plain_loss, list(plain.parameters()))
    assert loss.item() == plain_loss.item()
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads, strict=True))
    assert all(g.abs().sum() > 0 for g in grads)  # every layer is trained, none is cut off by a delay


def test_fixed_cost_refuses_an_unknown_way_to_wait() -> None:
    with pytest.raises(ValueError, match="spin.*sleep"):
        make_model((4,), 2, how="nap")


def test_bench_bubble_runs_a_pipeline_and_reports_the_formula(tmp_path: Path, digits_dataset: Path) -> None:
    out = tmp_path / "bubble.json"
    p = run_cli(
        "bench", "bubble", "--compute", "fixed", "--how", "sleep", "--us-per-sample", "20",
        "--stages", "2", "--micro-batches", "2,4", "--batch", "64", "--steps", "3",
        "--data", str(digits_dataset), "--drift-s", "0.5", "--json", str(out),
        timeout=240,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [(r["stages"], r["micro_batches"]) for r in report["rows"]] == [(2, 2), (2, 4)]
    for r in report["rows"]:
        assert r["bubble_theory"] == pytest.approx(1 / (r["micro_batches"] + 1))
        assert 0.0 <= r["bubble_fraction"] < 1.0
        assert r["excess_pp"] == pytest.approx(100 * (r["bubble_fraction"] - r["bubble_theory"]))
        assert len(r["compute_s_per_rank"]) == 2 and min(r["compute_s_per_rank"]) > 0
    drift = report["drift"]
    assert drift is not None and len(drift["window_sd_pct_per_core"]) == len(drift["cores"]) >= 2
    assert -1.0 <= drift["cross_core_corr"] <= 1.0
    table = out.with_suffix(".md").read_text()
    assert "| 2 | 4 | 0.200 |" in table and "core drift" in table and table in p.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stages", "3", "--compute", "fixed"], "--stages: --compute fixed has 8 blocks"),
        (["--micro-batches", "4,x"], "--micro-batches: expected comma-separated integers"),
        (["--batch", "100", "--micro-batches", "8"], "--batch: 100 does not split into 8 micro-batches"),
        (["--steps", "1"], "--steps: at least 2"),
    ],
)
def test_bench_bubble_bad_arguments_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    p = run_cli("bench", "bubble", *args, timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith(f"hpcai bench bubble: error: {message}")
