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
