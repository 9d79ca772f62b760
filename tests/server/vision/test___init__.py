"""server.vision: engines built once, on first use; package versions as revisions."""

from __future__ import annotations

import threading

import pytest

from server.vision import Loading, package_version, thread_count


def test_an_engine_is_built_on_first_use_and_once() -> None:
    built: list[object] = []

    def build() -> object:
        built.append(object())
        return built[-1]

    loading = Loading(build)
    assert built == []  # nothing before a task needs it
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(loading.get())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(built) == 1
    assert results == built * 4


def test_a_failed_build_fails_that_call_and_is_tried_again() -> None:
    attempts = iter([RuntimeError("no weights"), "engine"])

    def build() -> str:
        outcome = next(attempts)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    loading = Loading(build)
    with pytest.raises(RuntimeError, match="no weights"):
        loading.get()
    assert loading.get() == "engine"


def test_package_versions_name_the_weights() -> None:
    assert package_version("rapidocr") == "3.10.0"
    assert package_version("no-such-distribution-here") == ""


def test_thread_count_follows_the_worker_s_omp_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert thread_count() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "zero")
    assert thread_count() is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert thread_count() is None
