"""Every Redis key pixelstream uses, and how long each lives. One place, so the layout is
readable at a glance and two modules never disagree about a name."""

from __future__ import annotations

PREFIX = "ps:"

# Uploads: a hash of metadata and state, the bytes in a string, and an index of idle ones.
IDLE_UPLOADS = PREFIX + "uploads:idle"
"""Sorted set: token → wall time of its last write, for partial uploads."""


def upload(token: str) -> str:
    """Hash: meta (JSON), owner, received, complete, last_write."""
    return f"{PREFIX}upload:{token}"


def upload_data(token: str) -> str:
    """String: the bytes received so far (APPENDed in order)."""
    return f"{PREFIX}upload:{token}:data"


def upload_lock(token: str) -> str:
    """String: the holder of an upload's write lock (one tus PATCH at a time, any gateway)."""
    return f"{PREFIX}upload:{token}:lock"


HELD_BYTES = PREFIX + "uploads:held"
"""Hash: client → bytes of its unfinished uploads in Redis, and ``*`` → all clients' (the
byte caps). Each upload's record names the client (``client``) its bytes count against."""


def staged_image(name: str) -> str:
    """String: a whole image that arrived in one piece (HTTP), for a worker to read."""
    return f"{PREFIX}image:{name}"


# Results.
def result(cache_key: str) -> str:
    return f"{PREFIX}result:{cache_key}"


# Jobs: one stream (and consumer group) per task, with two counters for queue positions, so a
# worker reads only the streams of the tasks it serves. Names carry ``tasks:`` (the layout of
# earlier versions had one ``ps:jobs`` stream): gateways and workers of one version agree.
JOBS_GROUP = "workers"


def task_jobs(task: str) -> str:
    """Stream: the jobs (tiles included) of one task, read by the ``workers`` group."""
    return f"{PREFIX}tasks:{task}:jobs"


def task_jobs_added(task: str) -> str:
    """Counter: jobs of ``task`` ever queued (a job's sequence number is the value after its
    INCR)."""
    return f"{PREFIX}tasks:{task}:added"


def task_jobs_taken(task: str) -> str:
    """Counter: jobs of ``task`` ever taken by a worker (or withdrawn). Position = sequence -
    taken."""
    return f"{PREFIX}tasks:{task}:taken"


GENERATION = PREFIX + "generation"
"""A random value set once per Redis lifetime: when it changes, Redis restarted empty and
every job queued before is gone."""
WORKERS = PREFIX + "workers:serving"
"""Hash: worker name → JSON ``{"beat": wall time of its last heartbeat, "tasks": [names it
serves]}``."""


def job_reply(job_id: str) -> str:
    """String: the gateway that wants this job's events (moves when its client resumes)."""
    return f"{PREFIX}job:{job_id}:reply"


def job_outcome(job_id: str) -> str:
    """String: the job's final event, set once, for a gateway that comes asking later."""
    return f"{PREFIX}job:{job_id}:outcome"


def gateway_events(gateway_id: str) -> str:
    """Stream: events of the jobs this gateway follows."""
    return f"{PREFIX}events:{gateway_id}"


# Rate limits.
def rate(key: str) -> str:
    return f"{PREFIX}rate:{key}"


# Lifetimes -----------------------------------------------------------------------------------
COMPLETE_UPLOAD_TTL_S = 3600
"""A finished upload's bytes and record wait this long at most for a worker and a resume."""
STAGED_IMAGE_TTL_S = 3600
JOB_TTL_S = 3600
"""Reply routes and outcomes of jobs."""
EVENTS_MAXLEN = 10_000
"""Approximate cap on a gateway's event stream."""
EVENTS_TTL_S = 600
"""A gateway refreshes its event stream's lifetime while alive; a dead gateway's goes."""
UPLOAD_LOCK_TTL_S = 30.0
"""An upload's write lock lapses this long after its holder last refreshed it (a gateway that
died mid-request does not lock the upload for ever)."""
CONNECTIONS_TTL_S = 3600
"""Connection counts of a crashed gateway's clients fade after this."""
WORKER_STALE_S = 10.0
"""A worker without a heartbeat for this long no longer counts as ready."""


# Model rollouts.
MODEL_SWITCHES = PREFIX + "models:switches"
"""Pub/sub channel: a gateway that switched a model's revision announces it here (JSON
``{"name", "revision"}``); every other gateway follows."""
