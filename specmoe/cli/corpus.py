"""``specmoe corpus build``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Build text corpora from offline sources.", no_args_is_help=True, rich_markup_mode=None)


@app.command("build")
def build(
    out: Annotated[Path, typer.Option(help="Output .jsonl.gz file.")],
    sources: Annotated[list[str], typer.Option("--source", help="web-bible, python-docs or fortunes; repeatable.")] = [
        "web-bible",
        "python-docs",
    ],
    max_chars_per_source: Annotated[int | None, typer.Option(help="Cap per source, in characters.")] = None,
) -> None:
    """Build a JSONL corpus from installed Debian packages.

    One document per line, with ids."""
    from specmoe.corpus.documents import write_jsonl_gz
    from specmoe.corpus.sources import build_corpus

    documents = build_corpus(sources, max_chars_per_source)
    write_jsonl_gz(documents, out)
    typer.echo(f"wrote {len(documents)} documents ({sum(len(d.text) for d in documents)} characters) to {out}")
