import pytest

from chunking.limits import Limits


def test_defaults_are_the_protocol_examples() -> None:
    assert Limits().to_dict() == {
        "max_image_bytes": 268435456,
        "max_chunk_bytes": 4194304,
        "max_pixels": 178956970,
        "max_uploads": 8,
        "window_bytes": 16777216,
    }


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "8"])
def test_limits_must_be_positive_integers(value: object) -> None:
    with pytest.raises(ValueError, match="max_uploads"):
        Limits(max_uploads=value)  # type: ignore[arg-type]


def test_from_dict_ignores_keys_added_later() -> None:
    limits = Limits.from_dict({"max_uploads": 3, "max_frames_per_second": 30})
    assert limits.max_uploads == 3


def test_message_limit_leaves_room_for_a_slightly_too_large_base64_chunk() -> None:
    limits = Limits(max_chunk_bytes=3000)
    assert limits.max_base64_chunk_chars == 4000
    too_large_chunk_as_json = 4 * ((3000 + 300) // 3) + 100
    assert limits.max_message_bytes > too_large_chunk_as_json
