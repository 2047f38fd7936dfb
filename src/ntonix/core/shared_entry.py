"""A cached response as one Valkey value: what level 2 of the cache stores and reads back.

Layout (integers big-endian): the 6-byte format tag (`NTXL2` and a version byte); the SHA-256 of
the cache key the value was written under; when it was stored (wall-clock seconds, a double);
the status (u16); the header count (u16); the tokens the answer took (a u8 flag: 0 none known,
1 reported, 2 estimated; then prompt and completion tokens, u64 each); then per header its name
length (u16), value length (u32), name and value; the chunk count (u32), then per chunk its
length (u32) and bytes; last, a 16-byte BLAKE2b checksum of everything before it.

Invariants: `decode(key, encode(key, ...))` gives back exactly the status, headers, chunks (in
order) and usage encoded, so a hit in L2 counts the same tokens as one in L1; any other value
(cut short at any byte, any byte altered, written by another format version or under another
key, or not ours at all) raises `UnusableEntry` and is never taken for a response. Nothing of
the request is in the value but the key's hash.
"""

from __future__ import annotations

import hashlib
import struct

import attrs

from ntonix.core.lru import CachedResponse, Header
from ntonix.core.usage import Usage

FORMAT = b"NTXL2\x02"  # version 2: with the usage
_CHECKSUM = 16
_HEAD = struct.Struct(">32sdHHBQQ")  # key hash, stored at, status, header count, usage
_HEADER = struct.Struct(">HI")
_COUNT = struct.Struct(">I")


class UnusableEntry(Exception):
    """A stored value that must be treated as a miss; `reason` is one word for the counters."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@attrs.frozen
class StoredEntry:
    status: int
    headers: tuple[Header, ...]
    chunks: tuple[bytes, ...]
    stored_at: float  # wall-clock seconds (time.time()) when it was stored
    usage: Usage | None = None  # the tokens it took to generate


_NO_USAGE, _REPORTED, _ESTIMATED = 0, 1, 2


def encode(key: str, response: CachedResponse, stored_at: float) -> bytes:
    """The value to SET under `key`; `stored_at` is wall-clock time, shared by every machine."""
    usage = response.usage
    flag = _NO_USAGE if usage is None else _ESTIMATED if usage.estimated else _REPORTED
    prompt, completion = (usage.prompt, usage.completion) if usage is not None else (0, 0)
    parts = [
        FORMAT,
        _HEAD.pack(
            _key_hash(key),
            stored_at,
            response.status,
            len(response.headers),
            flag,
            prompt,
            completion,
        ),
    ]
    for name, value in response.headers:
        parts += (_HEADER.pack(len(name), len(value)), name, value)
    parts.append(_COUNT.pack(len(response.chunks)))
    for chunk in response.chunks:
        parts += (_COUNT.pack(len(chunk)), chunk)
    body = b"".join(parts)
    return body + _checksum(body)


def decode(key: str, value: bytes) -> StoredEntry:
    """The entry stored under `key`; UnusableEntry when `value` is anything else."""
    if len(value) < len(FORMAT) + _CHECKSUM or not value.startswith(FORMAT[:-1]):
        raise UnusableEntry("foreign")
    if value[len(FORMAT) - 1] != FORMAT[-1]:
        raise UnusableEntry("version")
    body = memoryview(value)[:-_CHECKSUM]
    if _checksum(body) != value[-_CHECKSUM:]:
        raise UnusableEntry("checksum")
    try:
        return _parse(key, body)
    except struct.error:
        raise UnusableEntry("malformed") from None


def _parse(key: str, body: memoryview) -> StoredEntry:
    offset = len(FORMAT)
    key_hash, stored_at, status, header_count, flag, prompt, completion = _HEAD.unpack_from(
        body, offset
    )
    if key_hash != _key_hash(key):
        raise UnusableEntry("other-key")
    if flag not in (_NO_USAGE, _REPORTED, _ESTIMATED):
        raise UnusableEntry("malformed")
    usage = None if flag == _NO_USAGE else Usage(prompt, completion, flag == _ESTIMATED)
    offset += _HEAD.size
    headers = []
    for _ in range(header_count):
        name_length, value_length = _HEADER.unpack_from(body, offset)
        offset += _HEADER.size
        name = _take(body, offset, name_length)
        offset += name_length
        headers.append((name, _take(body, offset, value_length)))
        offset += value_length
    (chunk_count,) = _COUNT.unpack_from(body, offset)
    offset += _COUNT.size
    chunks = []
    for _ in range(chunk_count):
        (length,) = _COUNT.unpack_from(body, offset)
        offset += _COUNT.size
        chunks.append(_take(body, offset, length))
        offset += length
    if offset != len(body):
        raise UnusableEntry("malformed")
    return StoredEntry(status, tuple(headers), tuple(chunks), stored_at, usage)


def _take(body: memoryview, offset: int, length: int) -> bytes:
    if offset + length > len(body):
        raise UnusableEntry("malformed")
    return bytes(body[offset : offset + length])


def _key_hash(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _checksum(body: bytes | memoryview) -> bytes:
    return hashlib.blake2b(body, digest_size=_CHECKSUM).digest()
