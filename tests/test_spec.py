"""Job spec loading and validation: bad input is one line naming file and key, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcai.errors import SpecError
from hpcai.spec import JobSpec, load_spec
from tests.conftest import ROOT, run_cli


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "job.toml"
    p.write_text(text)
    return p


def test_shipped_job_is_valid_and_round_trips(tmp_path: Path) -> None:
    spec = load_spec(ROOT / "jobs/digits.toml")
    assert spec.job.ranks == 2 and spec.train.strategy == "data" and spec.model.name == "mlp"
    again = load_spec(write(tmp_path, spec.to_toml()))
    assert again.to_dict() == spec.to_dict()
    assert again.spec_hash() == spec.spec_hash()


def test_embedded_default_is_the_digits_job() -> None:
    """`hpcai run` with no spec runs exactly jobs/digits.toml."""
    assert load_spec(None).to_dict() == load_spec(ROOT / "jobs/digits.toml").to_dict()


def test_readme_documents_every_spec_key() -> None:
    from hpcai.spec import field_docs

    readme = (ROOT / "README.md").read_text()
    for section, rows in field_docs().items():
        assert f"**[{section}]**" in readme
        for key, default, _ in rows:
            assert f"| `{key}` | `{default}` |" in readme, f"README lacks {section}.{key} (default {default})"


@pytest.mark.parametrize(
    "text, key, fragment",
    [
        ("[train]\nlrr = 0.1\n", "train.lrr", "did you mean 'lr'"),
        ("[trian]\nlr = 0.1\n", "[trian]", "did you mean 'train'"),
        ("[train]\nlr = 'fast'\n", "train.lr", "expected float"),
        ("[train]\nlr = -1.0\n", "train.lr", "must be > 0"),
        ("[train]\nepochs = 1.5\n", "train.epochs", "expected int"),
        (
            "[job]\nranks = 3\n[train]\nbatch_size = 64\n",
            "train.batch_size",
            "does not divide across 3 ranks",
        ),
        ("[model]\nfactory = 'nowhere.py:make'\n", "model.factory", "no such file"),
        ("[model]\nfactory = 'no_colon'\n", "model.factory", "expected 'path/to/file.py:function'"),
        ("[train]\noptimizer = 'adamm'\n", "train.optimizer", "did you mean 'adam'"),
        ("[job]\nname = 'a/b'\n", "job.name", "without '/'"),
        ("[model]\nhidden = [64, 0]\n", "model.hidden", ">= 1"),
        ("[train]\nepochs = 0\nsteps = 0\n", "train.epochs", "set epochs or steps"),
        ("job = 3\n", "job", "must be a table"),
        ("[train\n", "not valid TOML", ""),
    ],
)
def test_bad_specs_name_file_and_key(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and key in msg and fragment in msg and "\n" not in msg


def test_overrides_parse_toml_values_and_bare_words() -> None:
    spec = load_spec(
        ROOT / "jobs/digits.toml", ["train.lr=0.5", "model.name=cnn", "model.hidden=[8, 8]"], ranks=4
    )
    assert spec.train.lr == 0.5 and spec.model.name == "cnn" and spec.model.hidden == [8, 8]
    assert spec.job.ranks == 4
    with pytest.raises(SpecError, match="expected section.key=value"):
        load_spec(None, ["lr=0.1"])
    with pytest.raises(SpecError, match="train.lr: must be > 0"):
        load_spec(None, ["train.lr=0"])


def test_spec_is_immutable() -> None:
    spec = JobSpec()
    with pytest.raises(AttributeError):
        spec.train.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["run", "missing.toml"], "missing.toml: no such job spec file"),
        (["run", "jobs/digits.toml", "--set", "train.lr=-3"], "jobs/digits.toml: train.lr: must be > 0"),
        (["run", "jobs/digits.toml", "-n", "0"], "-n: must be >= 1"),
        (
            ["run", "jobs/digits.toml", "-n", "5"],
            "train.batch_size: global batch 64 does not divide across 5 ranks",
        ),
        (["run", "jobs/digits.toml", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["validate", "jobs/digits.toml", "--set", "data.shardz=3"], "did you mean 'shards'"),
    ],
)
def test_cli_bad_input_exit_2_one_line_nothing_written(
    tmp_path: Path, args: list[str], fragment: str
) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(*args, "--run-dir", str(run_dir), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not run_dir.exists()


def test_validate_prints_resolved_spec(tmp_path: Path) -> None:
    proc = run_cli("validate", "jobs/digits.toml", "-n", "4", "--set", "train.lr=0.05", timeout=60)
    assert proc.returncode == 0, proc.stderr
    resolved = write(tmp_path, proc.stdout)
    spec = load_spec(resolved)
    assert spec.job.ranks == 4 and spec.train.lr == 0.05


@pytest.mark.parametrize(
    "item, key, fragment",
    [
        ("job.name.x=1", "job.name", "not a table: cannot set job.name.x"),
        ("model.hidden.width=3", "model.hidden", "not a table"),
        ('job.run_dir="runs/dir\\ud83d\\ude80"', "job.run_dir", "is not valid TOML"),
        ("train.lr=[0.1", "train.lr", "is not valid TOML"),
    ],
)
def test_bad_overrides_are_one_line_naming_the_key(item: str, key: str, fragment: str) -> None:
    """--set into a value that is not a table, or a quoted value that is not TOML (which used to become a
    string with its quotes in it: --run-dir runs/dir🚀 wrote to ./"runs/dir\\ud83d\\ude80"/)."""
    with pytest.raises(SpecError) as err:
        load_spec(ROOT / "jobs/digits.toml", [item])
    msg = str(err.value)
    assert msg.startswith(f"{ROOT / 'jobs/digits.toml'}: {key}:") and fragment in msg and "\n" not in msg
    with pytest.raises(SpecError, match=f"^<defaults>: {key}"):  # no file: the key is not there to hit
        load_spec(None, [item])


def test_bare_word_dates_are_text() -> None:
    """No key takes a date: --set job.name=2024-05-01 means the name, not a TOML date."""
    spec = load_spec(None, ["job.name=2024-05-01", "model.args.when=07:32:00"])
    assert spec.job.name == "2024-05-01" and spec.model.args == {"when": "07:32:00"}


def test_run_dir_flag_round_trips_unicode_and_refuses_undecodable_names() -> None:
    import os

    from hpcai.cli import _load, build_parser
    from hpcai.errors import UserError

    args = build_parser().parse_args(
        ["validate", "--run-dir", 'runs/dir🚀 "q"\\\n', "--set", "job.name=rocket🚀"]
    )
    spec = _load(args)
    assert spec.job.run_dir == 'runs/dir🚀 "q"\\\n' and spec.job.name == "rocket🚀"
    args = build_parser().parse_args(["validate", "--run-dir", os.fsdecode(b"runs/caf\xe9")])
    with pytest.raises(UserError, match=r"^--run-dir: 'runs/caf\\udce9': holds bytes that are not UTF-8"):
        _load(args)
