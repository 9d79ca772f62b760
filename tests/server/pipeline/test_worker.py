"""run_batch in-process, with tiny fake analyzers: event order and fault confinement."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic import ConfigDict

from chunking.errors import ErrorCode, ProtocolError
from chunking.messages import Stage
from server.pipeline.jobs import (
    Batch,
    Job,
    JobDone,
    JobFailed,
    Shutdown,
    StageReached,
    WorkerEvent,
)
from server.pipeline.worker import WorkerConfig, load_tasks, run_batch, serve
from server.runtime.pixels import PixelCache
from server.storage.base import ImageRef
from server.tasks.builtin.colors import Colors
from server.tasks.contract import DecodeHint, Task, TaskOptions, View
from tests.conftest import make_image

MAX_PIXELS = 40_000_000
SECRET = "/srv/secret/weights.bin"
"""Appears in every exception the fakes raise: it must never reach a client's message."""


class AnyOptions(TaskOptions):
    model_config = ConfigDict(extra="allow")


class FakeAnalyzer(Task):
    """Preprocess gives the image's width; predict multiplies by 10; encode wraps it.

    ``poison``: a width whose presence makes predict raise for the whole batch.
    ``bad_encode``: an output encode refuses. ``extra``: outputs predict adds to each answer.
    """

    name = "fake"
    Options = AnyOptions
    decode = DecodeHint(min_short_side=None)

    def __init__(self, *, poison: int | None = None, bad_encode: int | None = None,
                 extra: int = 0, bad_preprocess: int | None = None) -> None:
        self.poison = poison
        self.bad_encode = bad_encode
        self.bad_preprocess = bad_preprocess
        self.extra = extra
        self.loaded = False
        self.predict_calls: list[int] = []

    def setup(self, device: str) -> None:
        self.loaded = True

    def preprocess(self, view: View, options: Any) -> Any:
        if view.image.width == self.bad_preprocess:
            raise ZeroDivisionError(f"preprocess blew up reading {SECRET}")
        return view.image.width

    def predict(self, batch: Sequence[Any]) -> list[Any]:
        self.predict_calls.append(len(batch))
        if self.poison in batch:
            raise ValueError(f"CUDA error in {SECRET}")
        return [width * 10 for width in batch] + [0] * self.extra

    def encode(self, output: Any, view: View, options: Any) -> dict[str, Any]:
        if output == self.bad_encode:
            raise KeyError(SECRET)
        return {"value": output, "options": options.model_dump()}


def png(width: int) -> bytes:
    return make_image(width, 10, "PNG", seed=width)


def job(job_id: int, width: int, task: str = "fake", **options: Any) -> Job:
    data = png(width)
    return Job(job_id, task, options, ImageRef(size=len(data), data=data), MAX_PIXELS)


def run(analyzer: Any, *jobs: Job) -> list[WorkerEvent]:
    return list(run_batch({analyzer.name: analyzer}, Batch(list(jobs))))


def outcomes(events: list[WorkerEvent]) -> dict[int, JobDone | JobFailed]:
    out: dict[int, JobDone | JobFailed] = {}
    for event in events:
        if isinstance(event, (JobDone, JobFailed)):
            assert event.job_id not in out, f"two outcomes for job {event.job_id}"
            out[event.job_id] = event
    return out


def assert_clean(failed: JobDone | JobFailed, code: ErrorCode) -> None:
    """Failed with ``code``, and the message says what without paths or tracebacks."""
    assert isinstance(failed, JobFailed), failed
    assert failed.code is code
    assert failed.message
    for leak in ("/", "Traceback", "secret", "Error", 'File "'):
        assert leak not in failed.message, failed.message


def test_events_come_in_stage_order_with_one_outcome_per_job() -> None:
    analyzer = FakeAnalyzer()
    events = run(analyzer, job(1, 11, colors=2), job(2, 12), job(3, 13))
    assert events[:2] == [
        StageReached([1, 2, 3], Stage.DECODING),
        StageReached([1, 2, 3], Stage.INFERENCE),
    ]
    done = events[2:]
    assert [type(e) for e in done] == [JobDone] * 3
    assert [e.job_id for e in done] == [1, 2, 3]
    assert [e.result for e in done] == [  # type: ignore[union-attr]
        {"value": 110, "options": {"colors": 2}},
        {"value": 120, "options": {}},
        {"value": 130, "options": {}},
    ]
    first = done[0]
    assert isinstance(first, JobDone)
    assert first.image == {"width": 11, "height": 10, "format": "PNG"}
    assert set(first.timings_ms) == {"decode", "inference"}
    assert all(v >= 0 for v in first.timings_ms.values())
    assert analyzer.predict_calls == [3]  # one call for the whole batch


def test_an_empty_batch_yields_nothing() -> None:
    assert run(FakeAnalyzer()) == []


def test_a_batch_whose_predict_raises_is_retried_one_by_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    analyzer = FakeAnalyzer(poison=12)
    with caplog.at_level(logging.ERROR, logger="pixelstream.worker"):
        events = run(analyzer, job(1, 11), job(2, 12), job(3, 13))
    assert analyzer.predict_calls == [3, 1, 1, 1]
    result = outcomes(events)
    assert isinstance(result[1], JobDone)
    assert result[1].result["value"] == 110
    assert isinstance(result[3], JobDone)
    assert result[3].result["value"] == 130
    assert_clean(result[2], ErrorCode.INTERNAL)
    assert "CUDA error" in caplog.text  # the details go to the log, not to the client


@pytest.mark.parametrize("extra", [-1, 1], ids=["too-few", "too-many"])
def test_predict_returning_the_wrong_number_of_outputs(extra: int) -> None:
    class Miscounting(FakeAnalyzer):
        def predict(self, batch: Sequence[Any]) -> list[Any]:
            outputs = super().predict(batch)
            # Right when called one item at a time, wrong for a real batch.
            return outputs if len(batch) == 1 else outputs[: len(batch) + extra] + [0] * extra

    analyzer = Miscounting()
    events = run(analyzer, job(1, 11), job(2, 12))
    assert analyzer.predict_calls == [2, 1, 1]
    result = outcomes(events)
    assert [r.result["value"] for r in result.values()] == [110, 120]  # type: ignore[union-attr]


def test_predict_that_never_answers_one_output_per_item_fails_the_jobs() -> None:
    analyzer = FakeAnalyzer(extra=1)  # always one output too many: which one is whose?
    events = run(analyzer, job(1, 11), job(2, 12))
    assert analyzer.predict_calls == [2, 1, 1]
    result = outcomes(events)
    assert_clean(result[1], ErrorCode.INTERNAL)
    assert_clean(result[2], ErrorCode.INTERNAL)


def test_a_single_job_whose_predict_raises_fails_internal() -> None:
    analyzer = FakeAnalyzer(poison=11)
    result = outcomes(run(analyzer, job(1, 11)))
    assert_clean(result[1], ErrorCode.INTERNAL)


def test_encode_failing_for_one_item_fails_only_that_job() -> None:
    analyzer = FakeAnalyzer(bad_encode=120)
    events = run(analyzer, job(1, 11), job(2, 12), job(3, 13))
    assert analyzer.predict_calls == [3]  # no retry: predict was fine
    result = outcomes(events)
    assert isinstance(result[1], JobDone)
    assert isinstance(result[3], JobDone)
    assert_clean(result[2], ErrorCode.INTERNAL)


def test_an_unknown_task_fails_that_job_before_decoding() -> None:
    analyzer = FakeAnalyzer()
    events = run(analyzer, job(1, 11), job(2, 12, task="nope"), job(3, 13))
    result = outcomes(events)
    assert_clean(result[2], ErrorCode.UNKNOWN_TASK)
    assert isinstance(result[1], JobDone)
    assert isinstance(result[3], JobDone)
    staged = [i for e in events if isinstance(e, StageReached) for i in e.job_ids]
    assert 2 not in staged
    assert StageReached([1, 3], Stage.INFERENCE) in events


def test_a_missing_spool_file_fails_that_job(tmp_path: Path) -> None:
    gone = tmp_path / "released-spool-file"
    missing = Job(2, "fake", {}, ImageRef(size=100, path=str(gone)), MAX_PIXELS)
    events = run(FakeAnalyzer(), job(1, 11), missing)
    assert StageReached([1, 2], Stage.DECODING) in events
    result = outcomes(events)
    assert_clean(result[2], ErrorCode.INTERNAL)
    assert str(tmp_path) not in result[2].message  # type: ignore[union-attr]
    assert isinstance(result[1], JobDone)
    assert StageReached([1], Stage.INFERENCE) in events


def test_a_spool_file_is_read_by_path(tmp_path: Path) -> None:
    path = tmp_path / "spooled"
    path.write_bytes(png(17))
    image = ImageRef(size=path.stat().st_size, path=str(path))
    result = outcomes(run(FakeAnalyzer(), Job(1, "fake", {}, image, MAX_PIXELS)))
    assert isinstance(result[1], JobDone)
    assert result[1].result["value"] == 170


def test_bad_images_fail_with_the_decoders_code() -> None:
    garbage = Job(2, "fake", {}, ImageRef(size=5, data=b"hello"), MAX_PIXELS)
    data = png(30)
    huge = Job(3, "fake", {}, ImageRef(size=len(data), data=data), max_pixels=100)
    result = outcomes(run(FakeAnalyzer(), job(1, 11), garbage, huge))
    assert isinstance(result[1], JobDone)
    assert_clean(result[2], ErrorCode.INVALID_IMAGE)
    assert_clean(result[3], ErrorCode.TOO_MANY_PIXELS)


def test_preprocess_faults_fail_that_job_internal_and_protocol_errors_keep_their_code() -> None:
    class Picky(FakeAnalyzer):
        def preprocess(self, view: View, options: Any) -> Any:
            if view.image.width == 13:
                raise ProtocolError(ErrorCode.TOO_MANY_PIXELS, "too big for this model")
            return super().preprocess(view, options)

    analyzer = Picky(bad_preprocess=12)
    result = outcomes(run(analyzer, job(1, 11), job(2, 12), job(3, 13)))
    assert isinstance(result[1], JobDone)
    assert_clean(result[2], ErrorCode.INTERNAL)
    assert_clean(result[3], ErrorCode.TOO_MANY_PIXELS)
    assert analyzer.predict_calls == [1]


def test_no_inference_stage_when_every_job_failed_before_it() -> None:
    analyzer = FakeAnalyzer()
    garbage = Job(1, "fake", {}, ImageRef(size=5, data=b"hello"), MAX_PIXELS)
    events = run(analyzer, garbage)
    assert not any(isinstance(e, StageReached) and e.stage is Stage.INFERENCE for e in events)
    assert analyzer.predict_calls == []


def test_load_tasks_sets_each_task_up_on_its_device() -> None:
    fake = FakeAnalyzer()
    loaded = load_tasks(WorkerConfig((Colors(), fake), device="cpu"))
    assert list(loaded) == ["colors", "fake"]
    assert loaded["fake"] is fake
    assert fake.loaded


def test_the_image_is_described_as_displayed() -> None:
    """A PNG stored 60x40 whose EXIF orientation (6) shows it 40x60: ``image`` gives the size
    the boxes are reported in, so a box is always inside it."""
    import io

    from PIL import Image

    out = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (60, 40), "white").save(out, "PNG", exif=exif)
    data = out.getvalue()
    analyzer = FakeAnalyzer()
    done = outcomes(run(analyzer, Job(1, "fake", {}, ImageRef(size=len(data), data=data),
                                      MAX_PIXELS)))[1]
    assert isinstance(done, JobDone)
    assert done.image == {"width": 40, "height": 60, "format": "PNG"}
    assert done.result == {"value": 400, "options": {}}  # preprocess saw the upright width


class RecordingPipe:
    """The worker's end of the pipe: hands out ``messages``, records what is sent back."""

    def __init__(self, *messages: Any) -> None:
        self.incoming = list(messages)
        self.sent: list[Any] = []

    def recv(self) -> Any:
        return self.incoming.pop(0)

    def send(self, message: Any) -> None:
        self.sent.append(message)


def test_serve_sends_a_batch_s_events_in_a_few_lists_each_stage_at_once() -> None:
    garbage = Job(2, "fake", {}, ImageRef(size=5, data=b"hello"), MAX_PIXELS)
    batch = Batch([job(1, 11), garbage, job(3, 13), job(4, 14, task="nope")])
    pipe = RecordingPipe(batch, Shutdown())
    pixels = PixelCache()
    try:
        serve(pipe, {"fake": FakeAnalyzer()}, pixels)  # type: ignore[arg-type]
    finally:
        pixels.close()
    assert pipe.incoming == []  # it returned at Shutdown
    # The events run_batch yields, in order, cut after each stage (work starts there).
    assert pipe.sent[:2] == [
        [JobFailed(4, ErrorCode.UNKNOWN_TASK, "no worker model for 'nope'"),
         StageReached([1, 2, 3], Stage.DECODING)],
        [outcomes(pipe.sent[1])[2], StageReached([1, 3], Stage.INFERENCE)],
    ]
    assert_clean(outcomes(pipe.sent[1])[2], ErrorCode.INVALID_IMAGE)
    assert len(pipe.sent) == 3
    assert [type(e) for e in pipe.sent[2]] == [JobDone, JobDone]
    assert [e.result for e in pipe.sent[2]] == [{"value": 110, "options": {}},
                                                 {"value": 130, "options": {}}]
