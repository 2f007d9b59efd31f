"""The command a run records for each stage is one the CLI accepts: generated from the
stage's settings, not written by hand."""

import shlex

import typer.main

from specmoe.cli import app


def test_every_recorded_command_parses(finished_run):
    import json

    out, _ = finished_run
    stages = json.loads((out / "stages.json").read_text())
    commands = [record["command"] for record in stages.values() if record.get("command")]
    assert {c.split()[1] for c in commands} >= {"collect", "train", "evaluate", "simulate", "bench"}
    root = typer.main.get_command(app)
    for command in commands:
        words = shlex.split(command)[1:]
        group, args = root, words
        while hasattr(group, "list_commands"):  # down to the subcommand
            context = type(group).context_class(group)
            group, args = group.get_command(context, args[0]), args[1:]
        group.make_context(words[0], list(args))  # raises on an unknown option or a bad value
