from __future__ import annotations

from pathlib import Path

import pytest

from server.models.store import (
    ModelVersions,
    VersionError,
    is_versions_folder,
    list_models,
)
from tests.server.models.conftest import tiny_version


def test_add_names_a_version_by_its_content(tmp_path: Path,
                                            versions: tuple[ModelVersions, str, str]) -> None:
    store, first, second = versions
    assert first != second
    assert store.revisions() == [first, second]
    assert store.active() == first  # the first one added
    assert (store.folder / first / "config.json").is_file()
    # the same weights again: the same revision, no copy
    assert tiny_version(tmp_path / "again", store, ["a1", "a2"], seed=1) == first
    assert len(store.revisions()) == 2
    assert is_versions_folder(store.folder)
    assert not is_versions_folder(store.folder / first)
    assert [m.name for m in list_models(store.folder.parent)] == ["shapes"]


def test_activate_and_rollback_walk_a_stack(versions: tuple[ModelVersions, str, str],
                                            tmp_path: Path) -> None:
    store, first, second = versions
    third = tiny_version(tmp_path, store, ["c1", "c2"], seed=3)
    assert store.activate(second[:8]) == second  # a unique prefix is enough
    assert store.activate(third) == third
    assert store.active() == third
    assert store.previous() == second
    assert store.rollback() == second
    assert store.active() == second
    assert store.rollback() == first
    with pytest.raises(VersionError, match="no earlier revision"):
        store.rollback()
    assert store.active() == first


@pytest.mark.parametrize(("revision", "message"), [
    ("xyz", "is not 6-64 hex digits"),
    ("abcdef", "has no revision abcdef"),
])
def test_unknown_revisions_are_refused(versions: tuple[ModelVersions, str, str],
                                       revision: str, message: str) -> None:
    store, first, _ = versions
    with pytest.raises(VersionError, match=message):
        store.activate(revision)
    assert store.active() == first


def test_list_describes_each_version(versions: tuple[ModelVersions, str, str]) -> None:
    store, first, second = versions
    described = store.describe()
    assert described["name"] == "shapes"
    assert described["active"] == first
    assert [(r["revision"], r["active"]) for r in described["revisions"]] == [
        (first, True), (second, False)]


def test_add_refuses_a_folder_that_is_no_model(tmp_path: Path) -> None:
    with pytest.raises(VersionError, match="not a model folder"):
        ModelVersions(tmp_path / "m").add(tmp_path)
    with pytest.raises(VersionError, match="model name"):
        ModelVersions.under(tmp_path, "../evil")


def test_the_command_line_on_the_folder(versions: tuple[ModelVersions, str, str],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from server.cli import main

    store, first, second = versions
    root = str(store.folder.parent)
    assert main(["models", "list", "--root", root]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0] == "shapes"
    assert listed[1].startswith(f"  * {first}")
    assert listed[2].startswith(f"    {second}")
    assert main(["models", "activate", "shapes", second[:7], "--root", root]) == 0
    assert capsys.readouterr().out == f"shapes {second} is active\n"
    assert main(["models", "rollback", "shapes", "--root", root]) == 0
    assert store.active() == first
    assert main(["models", "rollback", "shapes", "--root", root]) == 2
    assert "no earlier revision" in capsys.readouterr().err
    assert main(["models", "activate", "shapes", "beefbeef", "--root", root]) == 2
