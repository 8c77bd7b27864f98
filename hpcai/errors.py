"""Errors a user can fix. The CLI prints them as one line and exits with status 2 (no traceback)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a job spec, a CLI argument, a dataset, a checkpoint or a profile.

    The message names the file and the key, e.g. ``jobs/x.toml: train.lr: must be > 0 (got -1.0)``.
    """

    exit_code = 2


class SpecError(UserError):
    """A job spec that does not validate."""


class DatasetError(UserError):
    """A dataset that is missing, malformed or fails its checksums."""
