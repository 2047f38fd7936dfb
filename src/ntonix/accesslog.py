"""The access log: one JSON line per client request, to stderr or a file.

Lines are collected in memory and written a few times a second by a task of the supervisor,
in a worker thread: a slow disk or a stderr pipe nobody drains must never stall the event
loop that carries the streams. If the backlog grows past `MAX_BACKLOG`, lines are dropped and
counted rather than held without bound; so are the lines of a batch that cannot be written (a
full disk), and that is logged once when it starts and once when writing works again.

Never in a line: API keys (a named key shows its name, any other "anonymous"), the query
string (clients put keys there too), the prompt.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from typing import BinaryIO

import trio

from ntonix.core.telemetry import RequestRecord

log = logging.getLogger("ntonix.accesslog")

FLUSH_INTERVAL = 0.2  # seconds
MAX_BACKLOG = 8 * 1024 * 1024  # bytes waiting to be written


def access_line(record: RequestRecord, now: float) -> bytes:
    """The record's line: compact JSON, the same bytes `json.dumps` with `(",", ":")`
    separators gives, written field by field (a dict and the generic encoder per request
    cost three times as much)."""
    ttft = record.first_byte_at
    usage = record.usage
    tenant = record.tenant
    ttfb = "null" if ttft is None else _number(round((ttft - record.started) * 1000, 3))
    line = (
        f'{{"time":"{_timestamp(record.wall_time)}"'
        f',"request_id":{_text(record.request_id.decode("latin-1"))}'
        f',"client":{_text(record.client)}'
        f',"key":{"null" if tenant is None else _text(tenant.name)}'
        f',"method":{_text(record.method)}'
        f',"path":{_text(record.path)}'
        f',"model":{_optional_text(record.model)}'
        f',"backend":{_optional_text(record.backend or None)}'
        f',"status":{record.status:d}'
        f',"cache":{_optional_text(record.cache or None)}'
        f',"outcome":{_text(record.outcome)}'
        f',"error":{_optional_text(record.error or None)}'
        f',"retries":{record.retries:d}'
        f',"ttfb_ms":{ttfb}'
        f',"duration_ms":{_number(round((now - record.started) * 1000, 3))}'
        f',"bytes_in":{record.bytes_in:d}'
        f',"bytes_out":{record.bytes_out:d}'
    )
    if usage is None:
        line += ',"prompt_tokens":null,"completion_tokens":null,"tokens_estimated":null'
    else:
        line += (
            f',"prompt_tokens":{usage.prompt:d},"completion_tokens":{usage.completion:d}'
            f',"tokens_estimated":{"true" if usage.estimated else "false"}'
        )
    if record.session is not None:
        line += ',"websocket":' + _ENCODER.encode(record.session.as_log())
    return (line + "}\n").encode()


# json's own C escaper (ASCII only, as `json.dumps` writes by default): quotes included.
_text = json.encoder.encode_basestring_ascii


def _optional_text(value: str | None) -> str:
    return "null" if value is None else _text(value)


def _number(value: float) -> str:
    """A float as json writes it: its repr (the round trip is exact), never NaN here."""
    return float.__repr__(value)


# Built once: json.dumps with options builds a new encoder on every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _timestamp(wall_time: float) -> str:
    """ISO 8601 in UTC with milliseconds: 2026-11-27T10:14:48.440Z."""
    second = int(wall_time)
    return f"{_formatted_second(second)}.{int((wall_time - second) * 1000):03d}Z"


# Every line of the same second reuses it: formatting a date is most of a line's cost.
@functools.lru_cache(maxsize=2)
def _formatted_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def open_target(target: str) -> BinaryIO | None:
    """The stream for `access_log`: None for "off"; OSError if a file cannot be opened."""
    if target == "off":
        return None
    if target == "stderr":
        # Our own object on fd 2, so a thread can write it without touching sys.stderr's buffer.
        return open(2, "wb", closefd=False)
    return open(target, "ab")


class AccessLog:
    def __init__(self, target: str) -> None:
        self.target = target
        self._file = open_target(target)
        self._retired: list[BinaryIO] = []  # replaced by a reload; closed after the next flush
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self.dropped = 0
        self._failing = False  # the last write failed
        self._writing = trio.Lock()

    def write(self, record: RequestRecord, now: float) -> None:
        if self._file is None:
            return
        line = access_line(record, now)
        if self._pending_bytes + len(line) > MAX_BACKLOG:
            self.dropped += 1
            return
        self._pending.append(line)
        self._pending_bytes += len(line)

    def replace(self, target: str, file: BinaryIO | None) -> None:
        """Log to `file` from now on (opened by the caller, so that a target that cannot be
        opened refuses a reload before anything changes). A reload reopens a file target even
        when its path is unchanged: that is how a rotated log is let go."""
        old, self._file, self.target = self._file, file, target
        if old is not None:
            self._retired.append(old)

    async def flush_forever(self) -> None:
        while True:
            await trio.sleep(FLUSH_INTERVAL)
            await self.flush()

    async def flush(self) -> None:
        async with self._writing:  # one batch at a time keeps the lines in order
            batch = b"".join(self._pending)
            lines = len(self._pending)
            self._pending.clear()
            self._pending_bytes = 0
            retired, self._retired = self._retired, []
            if self._file is None and not retired:
                return
            try:
                await trio.to_thread.run_sync(_write, self._file, batch, retired)
            except OSError as error:
                self.dropped += lines
                if not self._failing:
                    log.error(
                        "access log %s: cannot write: %s; dropping and counting lines until it can",
                        self.target,
                        error,
                    )
                self._failing = True
            else:
                if self._failing and batch:
                    log.warning("access log %s: writing again", self.target)
                    self._failing = False

    async def close(self) -> None:
        """The last flush, once no request can end any more (after the drain): what is pending
        goes to the file first, and only then is the file let go."""
        await self.flush()
        self.replace("off", None)
        await self.flush()


def _write(file: BinaryIO | None, data: bytes, retired: list[BinaryIO]) -> None:
    for old in retired:
        if old.fileno() != 2:  # stderr is not ours to close
            old.close()
    if file is not None and data:
        file.write(data)
        file.flush()
