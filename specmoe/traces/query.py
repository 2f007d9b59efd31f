"""SQL over a trace store with DuckDB: the example queries shipped in ``queries/`` or your own.

The shards are plain Parquet files, so any DuckDB (or polars, pandas, ``datasets``) reads
them without specmoe; this only saves typing the store's path into every query. A query
finds the store as ``getvariable('store')`` and its other settings the same way.
"""

from __future__ import annotations

import re
from pathlib import Path

from specmoe.errors import InputError
from specmoe.traces.store import TraceStore

QUERIES = Path(__file__).with_name("queries")
_VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def example_queries() -> dict[str, Path]:
    return {path.stem: path for path in sorted(QUERIES.glob("*.sql"))}


def query_text(name_or_file: str) -> str:
    """A shipped query by name (``expert_usage``), or the text of a ``.sql`` file."""
    examples = example_queries()
    if name_or_file in examples:
        return examples[name_or_file].read_text()
    path = Path(name_or_file)
    if path.suffix == ".sql" and path.is_file():
        return path.read_text()
    raise InputError(f"no query {name_or_file!r}: give a .sql file or one of the examples: {', '.join(examples)}")


def run_query(store_directory: str | Path, sql: str, variables: dict | None = None) -> tuple[list[str], list[tuple]]:
    """Run ``sql`` with ``store`` and ``variables`` set; returns (column names, rows)."""
    try:
        import duckdb
    except ImportError:
        raise InputError("queries need DuckDB: pip install 'specmoe[query]'") from None
    store = TraceStore.open(store_directory)
    connection = duckdb.connect()
    for name, value in {"store": str(store.directory), **(variables or {})}.items():
        if not _VARIABLE.match(name):
            raise InputError(f"--set {name}=...: a variable name is letters, digits and underscores")
        connection.execute(f"SET VARIABLE {name} = ?", [value])
    try:
        result = connection.execute(sql)
        return [column[0] for column in result.description], result.fetchall()
    except duckdb.Error as exc:
        raise InputError(f"query failed: {str(exc).splitlines()[0]}") from None
