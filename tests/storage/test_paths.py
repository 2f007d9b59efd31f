"""Names that become paths stay inside their root; deletion never leaves it."""

import os

import pytest

from specmoe.storage.paths import UnsafePathError, check_name, join_inside, remove_inside

TRAVERSALS = ["..", ".", "../victim", "a/../../victim", "/etc", "", ".hidden", "a\\..\\b", "a/b", "x\x00y", "é"]


@pytest.mark.parametrize("name", TRAVERSALS)
def test_unsafe_names_are_refused(name):
    with pytest.raises(UnsafePathError, match="not a safe name"):
        check_name(name, "predictor name")


@pytest.mark.parametrize("name", ["token", "interlayer-small", "lookahead-mlp", "v1.2_b+c", "A" * 100])
def test_ordinary_names_pass(name):
    assert check_name(name, "name") == name


def test_join_inside_refuses_traversal_and_links_that_lead_out(tmp_path):
    root, outside = tmp_path / "out", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    assert join_inside(root, "predictors/token") == root / "predictors" / "token"
    for relative in ("../elsewhere", "predictors/../../elsewhere", str(outside)):
        with pytest.raises(UnsafePathError):
            join_inside(root, relative)
    (root / "predictors").symlink_to(outside)  # a link inside the root that points out of it
    with pytest.raises(UnsafePathError, match="outside"):
        join_inside(root, "predictors/token")


def test_remove_inside_deletes_a_link_not_its_target_and_refuses_the_outside(tmp_path):
    root, victim = tmp_path / "out", tmp_path / "victim"
    root.mkdir()
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    (root / "link").symlink_to(victim)
    assert remove_inside(root, root / "link")
    assert not os.path.lexists(root / "link") and (victim / "precious").read_text() == "keep me"
    (root / "tree" / "sub").mkdir(parents=True)
    (root / "tree" / "sub" / "inner-link").symlink_to(victim)
    assert remove_inside(root, root / "tree")
    assert not (root / "tree").exists() and (victim / "precious").exists()
    for target in (victim, root, root / ".." / "victim", root / "link" / ".."):
        with pytest.raises(UnsafePathError, match="refusing to delete"):
            remove_inside(root, target)
    assert (victim / "precious").exists() and root.is_dir()
    assert not remove_inside(root, root / "never-made")
