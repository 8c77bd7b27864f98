"""Benchmarks: `hpcai bench NAME`, each against the real peer measured in the same run."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from hpcai.errors import UserError


def report_main(
    prog: str,
    argv: list[str],
    parse_args: Callable[[list[str]], Any],
    run: Callable[[Any], dict],
    format_text: Callable[[dict], str],
    write_plot: Callable[[dict, Any], None] | None = None,
) -> tuple[int, dict | None]:
    """The shared end of a report bench: parse, run, print the markdown table, write FILE.json + FILE.md
    (and ``--plot``); bad input is one line and exit 2, a failed run one line and exit 1."""
    try:
        args = parse_args(argv)
        report = run(args)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code, None
    except RuntimeError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1, None
    text = format_text(report)
    print(text, end="")
    if getattr(args, "json", None):
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        args.json.with_suffix(".md").write_text(text)
    if write_plot is not None and getattr(args, "plot", None):
        write_plot(report, args.plot)
    return 0, report
