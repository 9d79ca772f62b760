"""Settings: embedded defaults, ``PIXELSTREAM_*`` variables, overrides, and refusals."""

from __future__ import annotations

import dataclasses

import pytest

from chunking.limits import Limits
from server.settings import ENV_PREFIX, Settings
from server.tuning import machine_plan
from tests.support.setting_cases import SETTING_CASES

ENV_CASES = SETTING_CASES


def variable(name: str) -> str:
    return ENV_PREFIX + name.upper()


def test_defaults_are_the_documented_ones() -> None:
    settings = Settings.from_env({})
    assert settings == Settings()
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.limits == Limits()  # PROTOCOL.md's example values
    assert settings.api_tokens == ()
    assert settings.allowed_origins == ()
    assert settings.model is None
    assert settings.spool_dir is None
    plan = machine_plan()  # the inference defaults come from the machine (test_tuning)
    assert (settings.workers, settings.max_batch_size) == (plan.workers, plan.max_batch_size)


def test_the_cases_cover_every_field() -> None:
    assert set(ENV_CASES) == {f.name for f in dataclasses.fields(Settings)}


@pytest.mark.parametrize("name", sorted(ENV_CASES))
def test_every_field_is_settable_from_its_variable(name: str) -> None:
    text, expected = ENV_CASES[name]
    settings = Settings.from_env({variable(name): text})
    assert getattr(settings, name) == expected
    assert type(getattr(settings, name)) is type(expected)
    others = {f.name: getattr(Settings(), f.name) for f in dataclasses.fields(Settings)
              if f.name != name}
    assert {k: getattr(settings, k) for k in others} == others  # nothing else moved


def test_all_variables_at_once() -> None:
    environ = {variable(name): text for name, (text, _) in ENV_CASES.items()}
    settings = Settings.from_env(environ)
    assert {name: getattr(settings, name) for name in ENV_CASES} == {
        name: expected for name, (_, expected) in ENV_CASES.items()
    }


def test_lists_are_comma_separated_and_blank_items_dropped() -> None:
    settings = Settings.from_env({variable("api_tokens"): " one, two ,,three, "})
    assert settings.api_tokens == ("one", "two", "three")
    assert Settings.from_env({variable("api_tokens"): ""}).api_tokens == ()


def test_values_are_stripped_and_empty_optionals_mean_none() -> None:
    settings = Settings.from_env({variable("port"): " 8080 ", variable("model"): "  ",
                                  variable("spool_dir"): ""})
    assert settings.port == 8080
    assert settings.model is None
    assert settings.spool_dir is None


def test_other_variables_are_ignored() -> None:
    settings = Settings.from_env({"PIXELSTREAM_MODEL_DIR": "/elsewhere", "PORT": "1",
                                  "pixelstream_port": "2"})
    assert settings == Settings()


@pytest.mark.parametrize(
    ("name", "text"),
    [("port", "eighty"), ("port", "80.5"), ("port", ""), ("max_chunk_bytes", "4MB"),
     ("workers", "two"), ("max_wait_ms", "soon"), ("messages_per_second", ""),
     ("messages_per_second", "nan"), ("upload_idle_timeout_s", "NaN")],
)
def test_unparseable_values_raise_value_error_naming_the_variable(name: str, text: str) -> None:
    with pytest.raises(ValueError, match=variable(name)):
        Settings.from_env({variable(name): text})


@pytest.mark.parametrize(
    ("name", "text"),
    [("workers", "0"), ("workers", "-1"), ("uploads_per_minute", "-1"),
     ("result_ttl_s", "0"), ("max_batch_size", "0"), ("max_queue", "-1"), ("message_burst", "0"),
     ("max_wait_ms", "-1"), ("messages_per_second", "0"), ("max_chunk_bytes", "0"),
     ("max_image_bytes", "-5"), ("socket_bytes_per_second", "0"), ("memory_budget_bytes", "0"),
     ("socket_idle_timeout_s", "0"), ("ws_ping_interval_s", "-1"), ("http_header_timeout_s", "0"),
     ("http_body_timeout_s", "0"), ("shutdown_grace_s", "0"), ("job_timeout_s", "-1"),
     ("log_format", "xml"), ("readiness", "some"), ("device", "gpu"),
     ("device", "cuda:"), ("device", "cuda:x")],
)
def test_values_out_of_range_are_refused(name: str, text: str) -> None:
    with pytest.raises(ValueError, match=name):
        Settings.from_env({variable(name): text})


@pytest.mark.parametrize("name", ["max_wait_ms", "messages_per_second"])
def test_nan_is_refused_from_flags_too(name: str) -> None:
    """A NaN rate passes naive range checks and turns the token bucket off."""
    with pytest.raises(ValueError, match=name):
        Settings.from_env({}, **{name: float("nan")})


def test_a_gateway_without_workers_needs_a_shared_queue() -> None:
    assert Settings(workers=0, redis_url="redis://127.0.0.1:6379").workers == 0
    with pytest.raises(ValueError, match="workers"):
        Settings(workers=0)


def test_overrides_win_over_the_environment() -> None:
    environ = {variable("port"): "9001", variable("api_tokens"): "env-token",
               variable("workers"): "3"}
    settings = Settings.from_env(environ, port=9100, api_tokens=("flag-token",))
    assert settings.port == 9100
    assert settings.api_tokens == ("flag-token",)
    assert settings.workers == 3  # not overridden: the environment's


def test_none_overrides_are_skipped() -> None:
    settings = Settings.from_env({variable("port"): "9001"}, port=None, model=None)
    assert settings.port == 9001
    assert settings.with_overrides(port=None, workers=2) == dataclasses.replace(
        settings, workers=2
    )


def test_from_env_reads_the_process_environment_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(variable("max_uploads"), "5")
    assert Settings.from_env().max_uploads == 5


def test_limits_property_carries_the_limit_fields() -> None:
    settings = Settings(max_image_bytes=1000, max_chunk_bytes=100, max_pixels=5000,
                        max_uploads=2, window_bytes=400)
    assert settings.limits == Limits(max_image_bytes=1000, max_chunk_bytes=100,
                                     max_pixels=5000, max_uploads=2, window_bytes=400)
    assert settings.limits.max_message_bytes == Limits(
        max_chunk_bytes=100).max_message_bytes


def test_settings_are_immutable() -> None:
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]
