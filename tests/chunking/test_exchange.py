"""The client's upload state (chunking.exchange) with plain messages: no socket, no loop."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunking.errors import ErrorCode, ProtocolError
from chunking.exchange import (
    Acknowledged,
    AnnounceRefused,
    ChunkRefused,
    Failed,
    Finished,
    Phase,
    PlannedSpan,
    StageReached,
    Started,
    UploadExchange,
    Withdrawn,
)
from chunking.limits import MAX_NAME_LENGTH
from chunking.messages import (
    Accepted,
    Cancel,
    Cancelled,
    Chunk,
    Error,
    Progress,
    Result,
    Stage,
    Upload,
)
from chunking.reassembler import Reassembler

ID = "u1"


def accepted(offset: int = 0) -> Accepted:
    return Accepted(ID, offset, "tok")


def ack(received: int, total: int = 10) -> Progress:
    return Progress(ID, Stage.UPLOAD, received=received, total=total)


def mismatch(expected: int) -> Error:
    return Error(ErrorCode.OFFSET_MISMATCH, "gap", id=ID, expected=expected)


def result() -> Result:
    return Result(task="colors", result={}, image={}, cached=False, model="m", timings_ms={},
                  id=ID)


def sending(size: int = 10, chunk_size: int = 4, offset: int = 0) -> UploadExchange:
    exchange = UploadExchange(ID, size, chunk_size=chunk_size)
    exchange.announce()
    assert exchange.receive(accepted(offset)) == [Started(offset, "tok")]
    return exchange


def send(exchange: UploadExchange, window: int = 1 << 20) -> Chunk:
    span = exchange.next_span(window)
    assert span is not None
    chunk = exchange.chunk(span, b"x" * span.length)
    assert chunk is not None
    return chunk


# Announcing --------------------------------------------------------------------------------


def test_announce_builds_the_upload_and_owes_an_accept() -> None:
    exchange = UploadExchange(ID, 10, chunk_size=4)
    assert not exchange.replies_owed
    assert not exchange.live
    message = exchange.announce(sha256="ab" * 32, name="n" * (MAX_NAME_LENGTH + 5),
                                task="colors", options={"colors": 3}, resume="tok")
    assert message == Upload(ID, 10, sha256="ab" * 32, name="n" * MAX_NAME_LENGTH,
                             task="colors", options={"colors": 3}, resume="tok")
    assert exchange.replies_owed
    assert exchange.live  # the server may accept it: a give-up must cancel
    assert exchange.next_span(100) is None  # nothing is sent before the accept


def test_an_accept_resumes_from_the_servers_offset() -> None:
    exchange = sending(offset=6)
    assert (exchange.sent, exchange.acknowledged) == (6, 6)
    assert not exchange.replies_owed
    assert exchange.next_span(100) == PlannedSpan(6, 4, 0)


def test_a_refused_announce_holds_nothing_and_may_announce_again() -> None:
    exchange = UploadExchange(ID, 10, chunk_size=4)
    exchange.announce(resume="old")
    refusal = Error(ErrorCode.UNKNOWN_UPLOAD, "gone", id=ID)
    assert exchange.receive(refusal) == [AnnounceRefused(refusal)]
    assert (exchange.phase, exchange.live, exchange.replies_owed) == (Phase.IDLE, False, False)
    assert exchange.cancel() is None
    exchange = UploadExchange(ID, 10, chunk_size=4)
    exchange.announce(resume="old")
    exchange.receive(refusal)
    assert exchange.announce(resume=None).resume is None
    assert exchange.receive(accepted()) == [Started(0, "tok")]


def test_announcing_while_sending_is_a_misuse() -> None:
    exchange = sending()
    with pytest.raises(RuntimeError, match="sending"):
        exchange.announce()


# Sending within the window -----------------------------------------------------------------


def test_only_whole_chunks_are_sent_and_each_owes_a_reply() -> None:
    exchange = sending(size=10, chunk_size=4)
    assert exchange.next_span(3) is None  # no room for a whole chunk: wait
    first = send(exchange, 4)
    assert (first.offset, len(first.data)) == (0, 4)
    assert exchange.in_flight == 4
    assert exchange.pending_replies == 1
    assert exchange.replies_owed
    send(exchange)
    last = send(exchange)
    assert (last.offset, len(last.data)) == (8, 2)  # the last chunk is shorter
    assert exchange.next_span(100) is None  # all sent
    assert exchange.in_flight == 10


def test_acknowledgements_free_the_window_and_count_replies() -> None:
    exchange = sending(size=10, chunk_size=4)
    send(exchange)
    send(exchange)
    assert exchange.receive(ack(4)) == [Acknowledged(sent=8, acknowledged=4, advanced=4)]
    assert (exchange.in_flight, exchange.pending_replies) == (4, 1)
    assert exchange.receive(ack(4)) == [Acknowledged(8, 4, 0)]  # repeated: nothing new
    assert exchange.pending_replies == 0
    assert not exchange.replies_owed


def test_an_acknowledgement_outside_the_upload_is_counted_and_ignored() -> None:
    exchange = sending(size=10, chunk_size=4)
    send(exchange)
    assert exchange.receive(ack(11)) == []
    assert exchange.pending_replies == 0
    assert exchange.acknowledged == 0


def test_later_stages_carry_their_detail() -> None:
    exchange = sending(size=4, chunk_size=4)
    assert exchange.receive(Progress(ID, Stage.QUEUED, position=2)) == [
        StageReached(Stage.QUEUED, {"position": 2})]
    assert exchange.receive(Progress(ID, Stage.DECODING)) == [StageReached(Stage.DECODING, {})]
    assert exchange.receive(Progress(ID, Stage.INFERENCE, total=48, done=12)) == [
        StageReached(Stage.INFERENCE, {"done": 12, "total": 48})]


def test_a_chunk_read_for_the_wrong_length_is_refused() -> None:
    exchange = sending(size=10, chunk_size=4)
    span = exchange.next_span(100)
    assert span is not None
    with pytest.raises(ValueError, match="read 3 bytes"):
        exchange.chunk(span, b"abc")


# Rewinds: stale replies and void spans -----------------------------------------------------


def test_an_offset_mismatch_asks_to_rewind_and_later_answers_are_stale() -> None:
    exchange = sending(size=12, chunk_size=4)
    send(exchange)
    send(exchange)
    send(exchange)
    refusal = mismatch(0)  # the first chunk was lost
    assert exchange.receive(refusal) == [ChunkRefused(refusal)]
    exchange.rewind(refusal.expected or 0)
    assert (exchange.sent, exchange.epoch, exchange.stale_replies) == (0, 1, 2)
    resent = send(exchange)
    assert resent.offset == 0
    # The answers to the second and third chunks, sent before the rewind: expected, ignored.
    assert exchange.receive(mismatch(0)) == []
    assert exchange.receive(mismatch(0)) == []
    assert exchange.stale_replies == 0
    # The resent chunk's answer counts again.
    assert exchange.receive(ack(4, 12)) == [Acknowledged(4, 4, 4)]
    assert not exchange.replies_owed


def test_a_stale_acknowledgement_still_counts() -> None:
    exchange = sending(size=12, chunk_size=4)
    send(exchange)
    send(exchange)
    exchange.receive(rate := Error(ErrorCode.RATE_LIMITED, "slow", id=ID, expected=0,
                                   retry_after_ms=5))
    exchange.rewind(rate.expected or 0)
    assert exchange.receive(ack(8, 12)) == [Acknowledged(8, 8, 8)]  # answered late, but held
    assert exchange.next_span(100) == PlannedSpan(8, 4, 1)


def test_a_span_planned_before_a_rewind_is_void() -> None:
    exchange = sending(size=12, chunk_size=4)
    send(exchange)
    planned = exchange.next_span(100)  # being read from disk...
    assert planned is not None
    exchange.receive(mismatch(0))
    exchange.rewind(0)  # ...while the server refused the first chunk
    assert exchange.chunk(planned, b"x" * planned.length) is None
    assert exchange.pending_replies == 0  # the refusal answered the first; the void span owes
    assert exchange.next_span(100) == PlannedSpan(0, 4, 1)  # nothing: resend from 0


def test_a_rewind_is_clamped_to_the_upload() -> None:
    exchange = sending(size=10, chunk_size=4)
    send(exchange)
    exchange.rewind(99)
    assert exchange.sent == 10


def test_a_recoverable_error_without_an_offset_ends_the_upload() -> None:
    exchange = sending()
    send(exchange)
    refusal = Error(ErrorCode.RATE_LIMITED, "slow", id=ID)
    assert exchange.receive(refusal) == [Failed(refusal)]
    assert exchange.done


# Outcomes ----------------------------------------------------------------------------------


def test_a_result_ends_it_and_nothing_is_left_to_cancel() -> None:
    exchange = sending(size=4, chunk_size=4)
    send(exchange)
    exchange.receive(ack(4, 4))
    outcome = result()
    assert exchange.receive(outcome) == [Finished(outcome)]
    assert (exchange.done, exchange.live, exchange.in_flight) == (True, False, 0)
    assert exchange.cancel() is None
    assert exchange.receive(ack(4, 4)) == []  # nothing happens after the outcome


def test_an_error_with_no_chunk_owed_is_an_outcome_the_server_forgot() -> None:
    exchange = sending(size=4, chunk_size=4)
    send(exchange)
    exchange.receive(ack(4, 4))
    failure = Error(ErrorCode.INVALID_IMAGE, "not an image", id=ID)
    assert exchange.receive(failure) == [Failed(failure)]
    assert exchange.cancel() is None


def test_an_error_for_a_chunk_leaves_the_upload_to_cancel() -> None:
    exchange = sending(size=10, chunk_size=4)
    send(exchange)
    failure = Error(ErrorCode.TOO_LARGE, "too big", id=ID)
    assert exchange.receive(failure) == [Failed(failure)]
    assert not exchange.replies_owed  # nothing more is awaited
    assert exchange.cancel() == Cancel(ID)
    assert exchange.cancel() is None  # once


def test_giving_up_after_a_refused_chunk_cancels_it() -> None:
    exchange = sending(size=10, chunk_size=4)
    send(exchange)
    exchange.receive(mismatch(0))
    exchange.abandon()
    assert exchange.in_flight == 0
    assert exchange.cancel() == Cancel(ID)


def test_a_confirmed_cancel_and_a_lost_socket_end_it() -> None:
    exchange = sending()
    assert exchange.receive(Cancelled(ID)) == [Withdrawn()]
    assert exchange.cancel() is None
    exchange = sending()
    send(exchange)
    exchange.connection_lost()
    assert (exchange.done, exchange.live, exchange.replies_owed) == (True, False, False)


# Against the server's reassembler, with chunks lost on the way -----------------------------


def serve(chunk: Chunk, reassembler: Reassembler, size: int) -> Any:
    """The server's answer to one chunk: an ack, or an offset_mismatch with its offset."""
    try:
        event = reassembler.receive(chunk)
    except ProtocolError as error:
        return Error(error.code, error.message, id=ID, expected=error.expected)
    return ack(event.received, size)


@settings(max_examples=80, deadline=None)
@given(
    size=st.integers(1, 300),
    chunk_size=st.integers(1, 64),
    window_chunks=st.integers(1, 5),
    refused=st.sets(st.integers(0, 40), max_size=6),
    delay=st.integers(0, 4),
)
def test_with_refused_chunks_every_byte_arrives_once_in_order(
    size: int, chunk_size: int, window_chunks: int, refused: set[int], delay: int
) -> None:
    """The server refuses the chunks numbered in ``refused`` (rate_limited, holding nothing of
    them) and its answers arrive up to ``delay`` chunks late, so chunks already sent after a
    refused one meet offset gaps. The exchange rewinds once per refusal, ignores the stale
    answers, and the server's reassembler ends holding exactly the data."""
    data = (bytes(range(256)) * 2)[:size]
    reassembler = Reassembler(size=size)
    exchange = UploadExchange(ID, size, chunk_size=chunk_size)
    exchange.announce()
    exchange.receive(accepted())
    window = window_chunks * chunk_size
    answers: list[Any] = []
    sent = rewinds = 0

    def deliver() -> None:
        nonlocal rewinds
        for event in exchange.receive(answers.pop(0)):
            assert not isinstance(event, Failed), event
            if isinstance(event, ChunkRefused):
                rewinds += 1
                exchange.rewind(event.error.expected or 0)

    while not exchange.all_acknowledged:
        span = exchange.next_span(window - exchange.in_flight)
        if span is None:
            assert answers, "stuck: nothing to send and no answer owed"
            deliver()
            continue
        chunk = exchange.chunk(span, data[span.offset : span.offset + span.length])
        assert chunk is not None
        if sent in refused:
            answers.append(Error(ErrorCode.RATE_LIMITED, "slow", id=ID,
                                 expected=reassembler.received, retry_after_ms=1))
        else:
            answers.append(serve(chunk, reassembler, size))
        sent += 1
        assert sent < 10_000
        if len(answers) > delay:
            deliver()
    assert bytes(reassembler.buffer) == data
    # One rewind per refusal, except refusals of chunks sent before a rewind: those are stale.
    assert rewinds <= len(refused)
    assert (rewinds > 0) == any(n < sent for n in refused)
    while answers:  # the answers still on their way are all stale or acknowledgements
        deliver()
    assert not exchange.replies_owed
