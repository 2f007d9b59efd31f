"""Finished benchmark runs survive an interruption: read back under the same settings,
dropped under others or when the file is unreadable, and a line cut short by a kill is
ignored."""

from specmoe.bench.progress import FinishedRuns, discard, progress_file_for


def test_runs_are_read_back_only_under_the_same_settings(tmp_path):
    path = tmp_path / "bench.partial.jsonl"
    first = FinishedRuns(path, {"tokens": 8, "fractions": (0.25,)})
    first.add(0, {"seconds": 1.5})
    first.add(3, {"seconds": 2.5})
    with path.open("a") as handle:
        handle.write('{"run": 4, "resu')  # killed mid-line
    assert FinishedRuns(path, {"tokens": 8, "fractions": (0.25,)}).done == {0: {"seconds": 1.5}, 3: {"seconds": 2.5}}
    assert FinishedRuns(path, {"tokens": 9, "fractions": (0.25,)}).done == {}
    assert FinishedRuns(path, {"tokens": 8, "fractions": (0.25,)}).done == {}, "other settings started the file over"


def test_discard_removes_the_file_and_no_path_keeps_nothing(tmp_path):
    path = progress_file_for(tmp_path / "bench.json")
    assert path.name == "bench.json.partial.jsonl"
    runs = FinishedRuns(path, {})
    runs.add(0, {})
    discard(path)
    assert not path.exists()
    discard(None)
    memory_only = FinishedRuns(None, {})
    memory_only.add(1, {"seconds": 1.0})
    assert memory_only.done == {1: {"seconds": 1.0}}


def test_an_unreadable_file_starts_over_instead_of_failing(tmp_path):
    path = tmp_path / "bench.partial.jsonl"
    path.write_bytes(b'{"settin\xff\n[1, 2]\n')
    runs = FinishedRuns(path, {"tokens": 8})
    assert runs.done == {}
    runs.add(0, {"seconds": 1.0})
    assert FinishedRuns(path, {"tokens": 8}).done == {0: {"seconds": 1.0}}
