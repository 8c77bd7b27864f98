"""Hostile values in a job spec: every key, every wrong kind of value, is one line naming the file and key
(exit 2, nothing written), and every string hpcai writes into job.toml reads back unchanged.

The per-key cases are generated from the spec's own sections, so a key added later is covered too.
"""

from __future__ import annotations

import json
import os
import tomllib
import typing
from pathlib import Path

import pytest

from hpcai.errors import SpecError
from hpcai.spec import SECTION_TYPES, dumps_toml, load_spec, toml_string
from tests.conftest import ROOT, run_cli

HUGE = "1" + "0" * 30  # 10**30: TOML integers are 64-bit


def _keys() -> list[tuple[str, str, typing.Any]]:
    return [
        (sec, key, tp) for sec, cls in SECTION_TYPES.items() for key, tp in typing.get_type_hints(cls).items()
    ]


def _wrong_values(tp: typing.Any) -> list[str]:
    """TOML values of the wrong kind for a key of type ``tp``."""
    values = ["1979-05-27T07:32:00Z", "07:32:00"]  # no key takes a date or a time
    if typing.get_origin(tp) is not dict:
        values.append("{ a = 1 }")  # a table where a scalar or a list is expected
    if tp in (int, float, bool):
        values += ['"3"', "[1, 2]"]
    if tp is int:
        values += [HUGE, f"-{HUGE}", "1.5", "true"]
    if tp is float:
        values += ["nan", "inf", "-inf", "true"]
    if tp is str:
        values += ["3", "[1, 'a']", '"a\\u0000b"']
    if typing.get_origin(tp) is list:
        values += ['[1, "a"]', "[[1]]", "[{ a = 1 }]", f"[{HUGE}]", "3"]
    return values


def _assert_one_line(err: pytest.ExceptionInfo, path: Path, key: str) -> str:
    msg = str(err.value)
    assert msg.startswith(f"{path}: {key}"), msg
    assert "\n" not in msg
    return msg


KEYS = _keys()


@pytest.mark.parametrize("sec, key, tp", KEYS, ids=[f"{s}.{k}" for s, k, _ in KEYS])
def test_every_key_refuses_wrong_kinds_of_value(tmp_path: Path, sec: str, key: str, tp: typing.Any) -> None:
    path = tmp_path / "job.toml"
    for value in _wrong_values(tp):
        path.write_text(f"[{sec}]\n{key} = {value}\n", encoding="utf-8")
        with pytest.raises(SpecError) as err:
            load_spec(path)
        _assert_one_line(err, path, f"{sec}.{key}")


LONG = "x" * 256


@pytest.mark.parametrize(
    "text, key, fragment",
    [
        # names and paths: what the file system cannot hold
        (f"[job]\nname = '{LONG}'\n", "job.name", "255 bytes"),
        (f"[job]\nrun_dir = 'runs/{LONG}'\n", "job.run_dir", "255 bytes"),
        ("[job]\nrun_dir = '" + "ab/" * 1400 + "'\n", "job.run_dir", "4095 bytes"),
        ("[data]\npath = ''\n", "data.path", "empty"),
        (f"[data]\npath = '{LONG}'\n", "data.path", "255 bytes"),
        (f"[model]\nfactory = '{LONG}.py:make'\n", "model.factory", "255 bytes"),
        (f"[slurm]\ntemplate = '{LONG}'\n", "slurm.template", "255 bytes"),
        ('[model]\nfactory = "a\\u0000.py:make"\n', "model.factory", "NUL"),
        # seeds: numpy takes [0, 2**32) for the ranks' seeds, non-negative ones for the split
        ("[train]\nseed = -1\n", "train.seed", "[0, 4294967295]"),
        ("[train]\nseed = 4294967296\n", "train.seed", "[0, 4294967295]"),
        ("[data]\nsplit_seed = -1\n", "data.split_seed", ">= 0"),
        # durations and sizes the OS's timers and the bucket planner overflow on
        ("[comm]\nstall_timeout_s = 1e308\n", "comm.stall_timeout_s", "<= 1e+09"),
        ("[checkpoint]\nevery_seconds = 1e308\n", "checkpoint.every_seconds", "<= 1e+09"),
        ("[ps]\ntimeout_s = 1e308\n", "ps.timeout_s", "<= 1e+09"),
        ("[ps]\nsimulate_compute_s = 1e308\n", "ps.simulate_compute_s", "<= 1e+09"),
        ("[comm]\nbucket_mb = 1e308\n", "comm.bucket_mb", "<= 1048576"),
        ("[comm]\nfirst_bucket_mb = 1e308\n", "comm.first_bucket_mb", "<= 1048576"),
        # counts of sections the strategy does not use are still counts
        ("[parallel]\nmicro_batches = 0\n", "parallel.micro_batches", ">= 1"),
        ("[parallel]\nstages = -1\n", "parallel.stages", ">= 1"),
        ("[ps]\nservers = 0\n", "ps.servers", ">= 1"),
        ("[ps]\nstaleness = -1\n", "ps.staleness", ">= 0"),
        ("[ps]\nheartbeat_s = 0.0\n", "ps.heartbeat_s", "> 0"),
        ("[ps]\nsimulate_compute_s = -1.0\n", "ps.simulate_compute_s", ">= 0"),
        ("[ps]\ntimeout_s = -1.0\n", "ps.timeout_s", "must exceed ps.heartbeat_s"),
        # built-in models no rank can build (a failed allocation, or hours of building, after the launch)
        ("[model]\nhidden = [10000000, 10000000]\n", "model.hidden", "TiB of float32"),
        ("[model]\nname = 'resnet'\nblocks = 4611686018427387904\n", "model.blocks", "blocks"),
        ("[model]\nname = 'transformer'\nlayers = 1000000\nheads = 1\n", "model.layers", "blocks"),
        ("[model]\nname = 'transformer'\nd_model = 1048576\n", "model.d_model", "TiB of float32"),
        ("[model]\nname = 'cnn'\nchannels = [1000000, 1000000]\n", "model.channels", "TiB of float32"),
        # model.args: what a model's keyword arguments can be
        ("[model.args]\nwhen = 1979-05-27T07:32:00Z\n", "model.args.when", "date/time"),
        ("[model.args]\nwhen = 1979-05-27\n", "model.args.when", "date/time"),
        ("[model.args]\nat = 07:32:00\n", "model.args.at", "date/time"),
        ("[model.args]\nwhen = [1, 1979-05-27]\n", "model.args.when[1]", "date/time"),
        ("[model.args]\nsub = { when = 1979-05-27 }\n", "model.args.sub.when", "date/time"),
        ("[model.args]\nwidth = nan\n", "model.args.width", "finite"),
        ("[model.args]\nwidth = -inf\n", "model.args.width", "finite"),
        (f"[model.args]\nwidth = {HUGE}\n", "model.args.width", "64-bit"),
        ('[model.args]\nname = "a\\u0000"\n', "model.args.name", "NUL"),
        ("[model.args]\n'a.b' = 1\n", "model.args.'a.b'", "keyword argument"),
        ("[model.args]\n'' = 1\n", "model.args.''", "keyword argument"),
    ],
)
def test_hostile_values_name_file_and_key(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    path = tmp_path / "job.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert fragment in _assert_one_line(err, path, key)


def test_model_args_take_numbers_strings_bools_and_lists_and_tables_of_them(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text(
        "[model.args]\nwidth = 3\nrate = 0.5\non = true\nname = 'x🚀'\nsizes = [1, 2.5, 'a', false, [3]]\n"
        "sub = { depth = 2, 'any key' = 'ok' }\nbig = 9223372036854775807\n",
        encoding="utf-8",
    )
    spec = load_spec(path)
    assert spec.model.args["sizes"] == [1, 2.5, "a", False, [3]] and spec.model.args["sub"]["any key"] == "ok"
    path.write_text(spec.to_toml(), encoding="utf-8")
    assert load_spec(path).to_dict() == spec.to_dict()


# Everything TOML can hold: control characters, quotes, backslashes, newlines, DEL, C1 controls, the BOM,
# the last BMP character and characters beyond it (json.dumps writes those as surrogate pairs: not TOML).
NASTY = [
    "".join(map(chr, range(0x00, 0x80))),
    "\x7f\x80\x9f\u2028\ufeff\uffff",
    'q"uo\'te\\back\\\\slash "\\u0041" \\n',
    "line\nbreak\r\n\ttab",
    "rocket🚀 dir\U0010ffff ñ 汉字",
    "",
]


def test_toml_strings_round_trip_every_character() -> None:
    for s in NASTY:
        doc = {"s": {"v": s, "args": {s: [s]}}}
        assert tomllib.loads(dumps_toml(doc)) == doc
    every = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)  # every Unicode scalar
    assert tomllib.loads(f"v = {toml_string(every)}")["v"] == every


@pytest.mark.parametrize("s", NASTY[1:-1])
def test_spec_strings_round_trip_through_job_toml(tmp_path: Path, s: str) -> None:
    """A resolved spec written as job.toml and read back is the same spec (what ranks and reruns read)."""
    path = tmp_path / "job.toml"
    name = s.replace("/", "_").replace("\\", "_").replace("\x00", "_")
    overrides = [
        f"job.name={toml_string(name)}",
        f"job.run_dir={toml_string('runs/' + name)}",
        f"data.path={toml_string('data/' + name)}",
        f"model.args.text={toml_string(s)}",
    ]
    spec = load_spec(None, overrides)
    assert spec.job.name == name and spec.model.args["text"] == s
    path.write_text(spec.to_toml(), encoding="utf-8")
    again = load_spec(path)
    assert again.to_dict() == spec.to_dict() and again.spec_hash() == spec.spec_hash()


def test_lone_surrogates_are_refused_not_written(tmp_path: Path) -> None:
    """An undecodable file name (bytes that are not UTF-8) reaches Python as lone surrogates, which no
    TOML file can hold: refused in one line naming the key, instead of a job.toml nobody can read."""
    name = os.fsdecode(b"runs/caf\xe9")
    with pytest.raises(SpecError) as err:
        load_spec(None, [f"job.run_dir={name}"])
    assert "job.run_dir" in str(err.value) and "UTF-8" in str(err.value)
    with pytest.raises(ValueError):
        toml_string(name)


@pytest.mark.parametrize(
    "path, fragment",
    [("x" * 300 + ".toml", "no such job spec file"), ("/proc/self/mem", "cannot read: Input/output error")],
)
def test_job_files_the_os_refuses_are_one_line(path: str, fragment: str) -> None:
    if not os.path.exists("/proc/self/mem") and path.startswith("/proc"):
        pytest.skip("no /proc/self/mem here (not Linux)")
    with pytest.raises(SpecError, match=f"^{path}: {fragment}$"):
        load_spec(path)


def test_undecodable_job_file_name_is_shown_readably(tmp_path: Path) -> None:
    """The source named in messages (and sent to the ranks as UTF-8 JSON) can always be encoded."""
    raw = os.fsencode(tmp_path) + b"/job\xff.toml"
    with open(raw, "w", encoding="utf-8") as f:
        f.write("[train]\nsteps = 3\n")
    spec = load_spec(os.fsdecode(raw))
    assert spec.source.encode("utf-8").endswith(b"job\\xff.toml")


# ---------------------------------------------------------------------------------------- the CLI, end to end


def test_cli_date_in_model_args_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    spec = tmp_path / "dt.toml"
    spec.write_text("[model.args]\nwhen = 1979-05-27T07:32:00Z\n", encoding="utf-8")
    run_dir = tmp_path / "run"
    for command in ("validate", "run"):
        proc = run_cli(command, str(spec), "--run-dir", str(run_dir), timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(f"hpcai: error: {spec}: model.args.when:"), proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert not run_dir.exists()


def test_unicode_run_dir_and_job_name_end_to_end(tmp_path: Path, digits_dataset: Path) -> None:
    """--run-dir runs/dir🚀 is that directory (not ./"runs/dir\\ud83d\\ude80"/), and job.name = "rocket🚀"
    trains: the ranks read the spec back from TOML."""
    proc = run_cli(
        "run",
        str(ROOT / "jobs/digits.toml"),
        "-n",
        "1",
        "--set",
        "train.steps=3",
        "--set",
        "job.name=rocket🚀",
        "--set",
        f"data.path={json.dumps(str(digits_dataset))}",
        "--set",
        'data.source=""',
        "--run-dir",
        "runs/dir🚀",
        cwd=tmp_path,
        timeout=150,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["runs"] and os.listdir(tmp_path / "runs") == ["dir🚀"]
    run_dir = tmp_path / "runs" / "dir🚀"
    written = load_spec(run_dir / "job.toml")
    assert written.job.name == "rocket🚀" and written.job.run_dir == "runs/dir🚀"
    assert json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))["steps"] == 3
