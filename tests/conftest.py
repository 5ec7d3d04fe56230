"""Shared fixtures: a throw-away cache and an in-process CLI runner."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import pytest

from ocd import cli


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run ``ocd ARGS`` in-process; returns exit code, stdout and stderr."""

    def run(*args: str) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["ocd", *map(str, args)])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        captured = capsys.readouterr()
        return CliResult(int(exit_info.value.code or 0), captured.out, captured.err)

    return run


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"
