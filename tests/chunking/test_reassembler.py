import hashlib
import mmap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunking.errors import ErrorCode, InvalidTransition, ProtocolError
from chunking.messages import Chunk
from chunking.reassembler import (
    TERMINAL_STATES,
    TRANSITIONS,
    Appended,
    Lifecycle,
    Reassembler,
    Replayed,
    UploadEvent,
    UploadState,
)

DATA = bytes(range(256)) * 4  # 1024 bytes


def chunk(offset: int, data: bytes) -> Chunk:
    return Chunk(id="u1", offset=offset, data=data)


def test_appends_in_order_and_reports_completion() -> None:
    r = Reassembler(len(DATA), upload_id="u1")
    assert r.receive(chunk(0, DATA[:500])) == Appended(received=500, total=1024, complete=False)
    assert r.receive(chunk(500, DATA[500:])) == Appended(received=1024, total=1024, complete=True)
    assert r.complete
    assert bytes(r.buffer) == DATA
    assert r.finish() == hashlib.sha256(DATA).hexdigest()


def test_chunk_entirely_below_the_offset_is_a_replay_and_changes_nothing() -> None:
    r = Reassembler(len(DATA))
    r.receive(chunk(0, DATA[:600]))
    assert r.receive(chunk(100, b"\x00" * 500)) == Replayed(received=600, total=1024)
    assert r.receive(chunk(0, DATA[:600])) == Replayed(received=600, total=1024)
    assert bytes(r.buffer) == DATA[:600]


@pytest.mark.parametrize(
    ("offset", "length", "why"),
    [
        (700, 10, "gap"),
        (500, 200, "overlap"),
        (600, 500, "past size"),
        (599, 2, "overlap by one"),
    ],
)
def test_out_of_order_chunks_are_refused_with_the_expected_offset(
    offset: int, length: int, why: str
) -> None:
    r = Reassembler(len(DATA), upload_id="u1")
    r.receive(chunk(0, DATA[:600]))
    with pytest.raises(ProtocolError) as caught:
        r.receive(chunk(offset, b"\x01" * length))
    assert caught.value.code is ErrorCode.OFFSET_MISMATCH, why
    assert caught.value.expected == 600
    assert caught.value.upload_id == "u1"
    # The upload stays open: the client rewinds and carries on.
    assert r.received == 600
    r.receive(chunk(600, DATA[600:]))
    assert bytes(r.buffer) == DATA


def test_empty_chunk_at_the_offset_is_a_no_op_and_elsewhere_follows_the_rules() -> None:
    r = Reassembler(10)
    r.receive(chunk(0, b"abcd"))
    assert r.receive(chunk(4, b"")) == Appended(received=4, total=10, complete=False)
    assert r.receive(chunk(2, b"")) == Replayed(received=4, total=10)
    with pytest.raises(ProtocolError):
        r.receive(chunk(5, b""))


def test_checksum_mismatch_is_detected() -> None:
    r = Reassembler(4, upload_id="u9", sha256="00" * 32)
    r.receive(chunk(0, b"abcd"))
    with pytest.raises(ProtocolError) as caught:
        r.finish()
    assert caught.value.code is ErrorCode.CHECKSUM_MISMATCH
    assert caught.value.upload_id == "u9"


def test_declared_checksum_in_upper_case_is_accepted() -> None:
    digest = hashlib.sha256(b"abcd").hexdigest()
    r = Reassembler(4, sha256=digest.upper())
    r.receive(chunk(0, b"abcd"))
    assert r.finish() == digest


def test_finish_before_the_last_byte_is_a_misuse() -> None:
    r = Reassembler(4)
    with pytest.raises(InvalidTransition):
        r.finish()


def test_resumed_upload_without_hash_state_hashes_the_buffer_at_the_end() -> None:
    buffer = bytearray(len(DATA))
    buffer[:300] = DATA[:300]
    digest = hashlib.sha256(DATA).hexdigest()
    r = Reassembler(len(DATA), buffer=buffer, received=300, sha256=digest)
    r.receive(chunk(300, DATA[300:]))
    assert r.finish() == digest


def test_resumed_upload_continues_the_given_hash_state() -> None:
    hasher = hashlib.sha256(DATA[:300])
    buffer = bytearray(len(DATA))
    buffer[:300] = b"\x00" * 300  # not what was hashed: proves the state is used, not the buffer
    r = Reassembler(len(DATA), buffer=buffer, received=300, hasher=hasher)
    r.receive(chunk(300, DATA[300:]))
    assert r.finish() == hashlib.sha256(DATA).hexdigest()


def test_writes_into_a_memory_map() -> None:
    with mmap.mmap(-1, len(DATA)) as mapped:
        r = Reassembler(len(DATA), buffer=mapped)
        for offset in range(0, len(DATA), 100):
            r.receive(chunk(offset, DATA[offset : offset + 100]))
        assert mapped[:] == DATA
        del r  # release the memoryview before the map closes


def test_buffer_must_match_the_declared_size() -> None:
    with pytest.raises(ValueError, match="buffer holds"):
        Reassembler(10, buffer=bytearray(9))
    with pytest.raises(ValueError, match="size"):
        Reassembler(0)


@st.composite
def chunkings(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, int]]]:
    """A byte string and a sequence of (offset, length) sends, replays included."""
    data = draw(st.binary(min_size=1, max_size=3000))
    sends: list[tuple[int, int]] = []
    offset = 0
    while offset < len(data):
        length = draw(st.integers(min_value=1, max_value=len(data) - offset))
        sends.append((offset, length))
        if draw(st.booleans()) and offset > 0:
            # A replay of something already held, as a client resending after a reconnect.
            start = draw(st.integers(min_value=0, max_value=offset - 1))
            end = draw(st.integers(min_value=start + 1, max_value=offset))
            sends.append((start, end - start))
        offset += length
    return data, sends


@settings(max_examples=300)
@given(chunkings())
def test_any_split_with_replays_reassembles_exactly(
    case: tuple[bytes, list[tuple[int, int]]],
) -> None:
    data, sends = case
    r = Reassembler(len(data), sha256=hashlib.sha256(data).hexdigest())
    for offset, length in sends:
        r.receive(chunk(offset, data[offset : offset + length]))
    assert r.complete
    assert bytes(r.buffer) == data
    r.finish()


@settings(max_examples=300)
@given(
    data=st.binary(min_size=1, max_size=500),
    held=st.integers(min_value=0, max_value=500),
    offset=st.integers(min_value=0, max_value=1000),
    length=st.integers(min_value=0, max_value=600),
)
def test_any_chunk_is_appended_replayed_or_refused_exactly_by_the_rules(
    data: bytes, held: int, offset: int, length: int
) -> None:
    held = min(held, len(data))
    r = Reassembler(len(data))
    if held:
        r.receive(chunk(0, data[:held]))
    payload = b"\x07" * length
    end = offset + length
    if offset == held and end <= len(data):
        assert isinstance(r.receive(chunk(offset, payload)), Appended)
        assert r.received == end
    elif end <= held:
        assert isinstance(r.receive(chunk(offset, payload)), Replayed)
        assert r.received == held
    else:
        with pytest.raises(ProtocolError) as caught:
            r.receive(chunk(offset, payload))
        assert caught.value.code is ErrorCode.OFFSET_MISMATCH
        assert caught.value.expected == held
        assert r.received == held


# Life cycle ---------------------------------------------------------------------------------


def run(*events: UploadEvent) -> Lifecycle:
    lifecycle = Lifecycle()
    for event in events:
        lifecycle.advance(event)
    return lifecycle


def test_the_full_path_ends_done() -> None:
    E = UploadEvent
    lifecycle = run(E.LAST_BYTE, E.QUEUED, E.DECODING, E.INFERENCE, E.RESULT)
    assert lifecycle.state is UploadState.DONE
    assert lifecycle.finished


def test_stages_may_be_skipped() -> None:
    E = UploadEvent
    assert run(E.LAST_BYTE, E.RESULT).state is UploadState.DONE  # a cached result
    assert run(E.LAST_BYTE, E.QUEUED, E.INFERENCE, E.RESULT).state is UploadState.DONE


@pytest.mark.parametrize(
    "events",
    [
        (UploadEvent.QUEUED,),  # before the last byte
        (UploadEvent.RESULT,),
        (UploadEvent.LAST_BYTE, UploadEvent.INFERENCE, UploadEvent.DECODING),  # reordered
        (UploadEvent.LAST_BYTE, UploadEvent.QUEUED, UploadEvent.QUEUED),
        (UploadEvent.CANCEL, UploadEvent.RESULT),  # nothing after a cancel
        (UploadEvent.LAST_BYTE, UploadEvent.RESULT, UploadEvent.CANCEL),  # nor after a result
        (UploadEvent.FAIL, UploadEvent.CANCEL),
    ],
)
def test_moves_outside_the_table_are_refused(events: tuple[UploadEvent, ...]) -> None:
    lifecycle = Lifecycle()
    *allowed, refused = events
    for event in allowed:
        lifecycle.advance(event)
    state = lifecycle.state
    assert not lifecycle.allows(refused)
    with pytest.raises(InvalidTransition, match="can't handle event"):
        lifecycle.advance(refused)
    assert lifecycle.state is state


def test_cancel_and_fail_are_possible_from_every_live_state() -> None:
    for state, moves in TRANSITIONS.items():
        if state in TERMINAL_STATES:
            assert moves == {}
        else:
            assert moves[UploadEvent.CANCEL] is UploadState.CANCELLED
            assert moves[UploadEvent.FAIL] is UploadState.FAILED
    assert set(TRANSITIONS) == set(UploadState)


def test_a_writer_places_the_bytes_instead_of_a_copy_into_the_buffer() -> None:
    buffer = bytearray(len(DATA))
    placed: list[tuple[int, bytes]] = []

    def writer(offset: int, data: bytes | bytearray | memoryview) -> None:
        placed.append((offset, bytes(data)))
        buffer[offset : offset + len(data)] = data

    r = Reassembler(len(DATA), buffer=buffer, writer=writer,
                    sha256=hashlib.sha256(DATA).hexdigest())
    r.receive(Chunk("u", 0, DATA[:100]))
    r.receive(Chunk("u", 0, DATA[:50]))  # a replay: not placed again
    r.receive(Chunk("u", 100, DATA[100:]))
    assert placed == [(0, DATA[:100]), (100, DATA[100:])]
    assert r.finish() == hashlib.sha256(DATA).hexdigest()


def test_a_given_hasher_is_fed_each_new_chunk_and_gives_the_digest() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.fed: list[bytes] = []

        def update(self, data: bytes | bytearray | memoryview, /) -> None:
            self.fed.append(bytes(data))

        def hexdigest(self) -> str:
            return hashlib.sha256(b"".join(self.fed)).hexdigest()

    recorder = Recorder()
    r = Reassembler(len(DATA), hasher=recorder, sha256=hashlib.sha256(DATA).hexdigest())
    r.receive(Chunk("u1", 0, DATA[:300]))
    r.receive(Chunk("u1", 0, DATA[:300]))  # a replay: not fed again
    r.receive(Chunk("u1", 300, DATA[300:]))
    assert recorder.fed == [DATA[:300], DATA[300:]]
    assert r.finish() == hashlib.sha256(DATA).hexdigest()
