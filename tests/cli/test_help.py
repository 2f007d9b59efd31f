"""Every command's help fits 80 columns, documents every option, and shows whole sentences."""

import pytest
import typer.main
from typer.testing import CliRunner

from specmoe.cli import app

runner = CliRunner()


def _commands(group, path=()):
    context = type(group).context_class(group)  # typer carries its own click
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        yield (*path, name), command
        if hasattr(command, "list_commands"):
            yield from _commands(command, (*path, name))


COMMANDS = list(_commands(typer.main.get_command(app)))


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS] + [()], ids=lambda p: " ".join(p) or "specmoe")
def test_help_fits_80_columns_and_documents_every_option(path):
    result = runner.invoke(app, [*path, "--help"], terminal_width=80, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    assert "…" not in result.output and "<bool>" not in result.output
    cut = [line for line in result.output.splitlines() if line.rstrip().endswith("...") and "Usage:" not in line]
    assert not cut, "a cut sentence"
    command = dict(COMMANDS).get(path)
    for param in getattr(command, "params", []):
        if param.param_type_name == "option" and param.name != "help":
            assert param.help, f"{' '.join(path)} {param.opts[0]} has no help"


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("specmoe ")
