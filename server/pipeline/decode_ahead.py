"""Decoding an upload while its bytes arrive, in a worker process.

A huge JPEG takes longer to decode (libjpeg reads every byte, even at 1/8 scale) than to
upload over a fast link. The gateway tells a worker where an upload's spool file is as soon
as the upload begins (:class:`~server.pipeline.jobs.DecodeAhead`), then how many bytes are in
place as chunks land (:class:`~server.pipeline.jobs.BytesArrived`). The worker decodes on a
thread beside its main one, blocking (never polling) whenever the decoder reaches bytes not
yet in.
When the upload's job reaches that worker, :meth:`DecodesAhead.take` hands over the decoded
image, usually finished or nearly so.

Uploads are append-only (PROTOCOL.md's offset rule), so the bytes below ``received`` never
change: the image decoded ahead is the image the job would have decoded, and the job exists
only once the gateway has every byte and has checked the checksum. A decode that fails ahead
is done again by the job, so a bad image is reported exactly as it would be otherwise.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
from collections.abc import Mapping

from server.pipeline.decode import DecodedImage, decode, probe
from server.pipeline.jobs import DecodeAhead
from server.tasks.contract import Task

log = logging.getLogger("pixelstream.worker")

MAX_DECODES_AHEAD = 2
"""Uploads a worker decodes while they arrive, at most at once (the pool sends no more; the
rest decode as jobs). As many threads: a decode whose job has come is never queued behind
decodes still waiting for bytes, which the worker could then not report to them."""


HEADER_BYTES = 64 * 1024
"""Read to tell a JPEG before decoding ahead (one whose frame header lies further is left
to its job)."""


class DecodeDropped(Exception):
    """Raised inside a decode ahead that was dropped, to end it."""


class NotAJpeg(Exception):
    """Raised inside a decode ahead of an image that is not a JPEG: its job decodes it."""


class AheadDecode:
    """One upload's decode on one of ``threads``, fed the count of bytes in place."""

    def __init__(self, request: DecodeAhead, analyzer: Task,
                 threads: concurrent.futures.Executor) -> None:
        self.request = request
        self._received = 0
        self._dropped = False
        self._arrived = threading.Condition()
        self.outcome: concurrent.futures.Future[DecodedImage] = concurrent.futures.Future()
        threads.submit(self._run, analyzer)

    def arrived(self, received: int) -> None:
        with self._arrived:
            if received > self._received:
                self._received = min(received, self.request.size)
                self._arrived.notify_all()

    def drop(self) -> None:
        with self._arrived:
            self._dropped = True
            self._arrived.notify_all()

    def _wait_for(self, end: int) -> None:
        with self._arrived:
            while self._received < end and not self._dropped:
                self._arrived.wait()
            if self._dropped:
                raise DecodeDropped(self.request.job_id)

    def _run(self, analyzer: Task) -> None:
        request = self.request
        try:
            if os.stat(request.path).st_size != request.size:
                raise ValueError("the spool file is not the upload's size")
            # Only JPEGs: their decode here is the job's own, pixel for pixel, and the one
            # format where decoding ahead was measured to gain; other formats shrink through
            # libvips in the job, which this streaming path cannot match.
            self._wait_for(min(request.size, HEADER_BYTES))
            with open(request.path, "rb") as file:
                header = probe(file.read(HEADER_BYTES))
            if header is None or header.format != "JPEG":
                raise NotAJpeg(request.job_id)
            decoded = decode(request.path, max_pixels=request.max_pixels,
                             hint=analyzer.decode, wait_for=self._wait_for)
        except BaseException as exc:  # the job decodes again, or reports it
            self.outcome.set_exception(exc)
        else:
            self.outcome.set_result(decoded)


class DecodesAhead:
    """A worker's decodes ahead, by job id. Used from the worker's main thread only."""

    def __init__(self, analyzers: Mapping[str, Task],
                 threads: int = MAX_DECODES_AHEAD) -> None:
        self._analyzers = analyzers
        self._running: dict[str, AheadDecode] = {}
        # Long-lived threads: each new thread would fill (and glibc keep) a malloc arena.
        self._threads = concurrent.futures.ThreadPoolExecutor(threads, "decode-ahead")

    def __len__(self) -> int:
        return len(self._running)

    def start(self, request: DecodeAhead) -> None:
        analyzer = self._analyzers.get(request.task)
        if analyzer is None or request.job_id in self._running:
            return
        self._running[request.job_id] = AheadDecode(request, analyzer, self._threads)

    def arrived(self, job_id: str, received: int) -> None:
        ahead = self._running.get(job_id)
        if ahead is not None:
            ahead.arrived(received)

    def drop(self, job_id: str) -> None:
        ahead = self._running.pop(job_id, None)
        if ahead is not None:
            ahead.drop()

    def close(self) -> None:
        """Drop every decode and wait for their threads (the process may then exit)."""
        for job_id in list(self._running):
            self.drop(job_id)
        self._threads.shutdown(wait=True)

    def take(self, job_id: str, path: str | None) -> DecodedImage | None:
        """The image decoded ahead for this job (waiting for the decode to end), or None when
        there is none or it failed: the job then decodes the usual way."""
        ahead = self._running.pop(job_id, None)
        if ahead is None:
            return None
        if ahead.request.path != path:
            ahead.drop()
            return None
        ahead.arrived(ahead.request.size)  # the job exists: every byte is in place
        try:
            return ahead.outcome.result()
        except Exception as exc:
            log.debug("job %s: the decode ahead failed (%s); decoding again", job_id, exc)
            return None
