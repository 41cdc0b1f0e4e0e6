"""ListJobs in pages: a page holds at most `page_size` jobs and stays under the message size limit; its token
names the last job it holds (created_at, id), so pages neither skip nor repeat jobs as new ones arrive."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable
from datetime import datetime

from coordinator.store.database import Database
from coordinator.store.views import is_job_id, list_job_keys
from fedmeki_core.errors import InvalidInputError
from fedmeki_core.proto.v1 import common_pb2, jobs_pb2
from fedmeki_core.records import JobState

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
_ROOM = 64 << 10  # left under the message limit for the framing and the token


def encode_token(created_at: datetime, job_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{job_id}".encode()).decode()


def decode_token(token: str) -> tuple[datetime, str] | None:
    """The (created_at, id) a page token names; None for the first page; InvalidInputError for anything else."""
    if not token:
        return None
    try:
        created, _, job_id = base64.urlsafe_b64decode(token.encode("ascii")).decode().partition("|")
        key = datetime.fromisoformat(created), job_id
    except (ValueError, UnicodeError, binascii.Error):
        key = None
    if key is None or key[0].tzinfo is None or not is_job_id(key[1]):
        raise InvalidInputError("page_token is not one this coordinator gave: send next_page_token as it came")
    return key


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidInputError(f"page_size {requested} is negative: 0 takes the default ({DEFAULT_PAGE_SIZE})")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def job_page(
    database: Database,
    states: Iterable[JobState],
    request: jobs_pb2.ListJobsRequest,
    job: Callable[[str], common_pb2.Job],
    max_bytes: int,
) -> jobs_pb2.ListJobsResponse:
    """One page of jobs (`job(id)` makes each one's message), cut early when the next would pass `max_bytes`."""
    size = page_size(request.page_size)
    with database.read() as session:
        keys = list_job_keys(session, states, decode_token(request.page_token), size + 1)
    response = jobs_pb2.ListJobsResponse()
    budget = max_bytes - _ROOM
    last: tuple[datetime, str] | None = None
    for index, (created_at, job_id) in enumerate(keys[:size]):
        message = job(job_id)
        if response.jobs and response.ByteSize() + message.ByteSize() + 8 > budget:
            break
        response.jobs.append(message)
        last = created_at, job_id
        if index + 1 == len(keys):  # the last job there is
            return response
    if last is not None:
        response.next_page_token = encode_token(*last)
    return response
