import pytest

from chunking.reassembler import Reassembler
from chunking.splitter import Span, UploadSender, iter_chunks


def test_spans_follow_chunk_size_and_the_window() -> None:
    sender = UploadSender(10, chunk_size=4)
    assert sender.next_span(100) == Span(0, 4)
    assert sender.next_span(3) == Span(4, 3)
    assert sender.unacknowledged == 7
    assert sender.next_span(0) is None  # window full
    assert sender.next_span(100) == Span(7, 3)
    assert sender.all_sent
    assert sender.next_span(100) is None


def test_progress_frees_the_window_and_never_moves_backwards() -> None:
    sender = UploadSender(10, chunk_size=5)
    sender.next_span(10)
    sender.next_span(10)
    sender.on_progress(5)
    assert sender.unacknowledged == 5
    sender.on_progress(3)  # a late, stale ack
    assert sender.acknowledged == 5
    sender.on_progress(10)
    assert sender.all_acknowledged


def test_accepted_offset_resumes_and_rewind_resends() -> None:
    sender = UploadSender(100, chunk_size=30)
    sender.on_accepted(40)
    assert sender.next_span(1000) == Span(40, 30)
    assert sender.next_span(1000) == Span(70, 30)
    sender.rewind(55)
    assert sender.unacknowledged == 0
    assert sender.next_span(1000) == Span(55, 30)


def test_offsets_outside_the_upload_are_refused() -> None:
    sender = UploadSender(10, chunk_size=4)
    with pytest.raises(ValueError, match="outside"):
        sender.on_progress(11)
    with pytest.raises(ValueError, match="outside"):
        sender.rewind(-1)


def test_iter_chunks_feeds_a_reassembler_exactly() -> None:
    data = bytes(range(200)) * 50
    r = Reassembler(len(data))
    for part in iter_chunks("u1", data, 333):
        assert len(part.data) <= 333
        r.receive(part)
    assert bytes(r.buffer) == data


def test_iter_chunks_from_a_resume_offset_yields_views() -> None:
    data = b"0123456789"
    parts = list(iter_chunks("u1", data, 4, start=6))
    assert [(p.offset, bytes(p.data)) for p in parts] == [(6, b"6789")]
    assert isinstance(parts[0].data, memoryview)
