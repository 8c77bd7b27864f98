"""Bad input found after the spec validated: one line naming the key, never a rank's traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcai.errors import SpecError, UserError
from hpcai.models import build_model
from hpcai.spec import ModelSection


def test_factory_arguments_it_cannot_take_name_model_args(tmp_path: Path) -> None:
    (tmp_path / "mymodel.py").write_text(
        "from torch import nn\n\ndef make(width, input_shape, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.Linear(width, num_classes))\n"
    )
    ref = f"{tmp_path}/mymodel.py:make"
    ok = build_model(ModelSection(factory=ref, args={"width": 8}), (1, 8, 8), 10)
    assert sum(p.numel() for p in ok.parameters()) > 0
    for args in ({"widht": 8}, {}):
        with pytest.raises(SpecError, match=r"model.args: .*mymodel.py:make cannot take them"):
            build_model(ModelSection(factory=ref, args=args), (1, 8, 8), 10)


def test_profile_and_template_names_the_os_refuses(tmp_path: Path) -> None:
    from hpcai.profiles import find_profile
    from hpcai.slurm import find_template

    long = "x" * 300
    with pytest.raises(UserError, match="no such cluster profile file"):
        find_profile(f"{tmp_path}/{long}.toml")
    with pytest.raises(UserError):
        find_template(long)
    with pytest.raises(UserError):
        find_template(f"{tmp_path}/{long}.j2")


def test_ps_batch_larger_than_the_data_is_one_line(tmp_path: Path, digits_dataset: Path) -> None:
    """The ps strategy checks the batch like the others (was a ValueError, exit 1)."""
    import json

    from tests.conftest import run_cli

    proc = run_cli("run", "jobs/digits_ps.toml", "-n", "3", "--set", "ps.servers=1", "--run-dir",
                   str(tmp_path / "r"), "--set", f"data.path={json.dumps(str(digits_dataset))}",
                   "--set", "train.batch_size=4096")  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("global batch 4096 is larger than the train split") == 1, proc.stderr


def test_a_missing_job_named_like_a_shipped_example_points_to_it(tmp_path: Path) -> None:
    """From an empty directory (a wheel install), `hpcai run jobs/digits.toml` says where the example is."""
    from tests.conftest import run_cli

    proc = run_cli("validate", "jobs/digits.toml", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "no such job spec file (hpcai ships an example of that name:" in proc.stderr
    assert proc.stderr.rstrip().endswith("digits.toml)")
