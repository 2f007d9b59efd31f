"""The import graph keeps the architecture of docs/design.md: no cycles between sibling
packages or modules, and data flowing one way (the contracts in .importlinter)."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold(monkeypatch, capsys):
    cli = pytest.importorskip("importlinter.cli", reason="import-linter is not installed (pip install -e '.[test]')")
    monkeypatch.chdir(ROOT)  # the contracts are read from ./.importlinter
    exit_code = cli.lint_imports(no_cache=True)
    assert exit_code == 0, capsys.readouterr().out[-3000:]
