"""Where shards are and how their bytes arrive: local paths, HTTP(S), any fsspec URL.

A shard set is named by a local directory or a URL prefix holding ``index.json`` and the
shards, by a brace pattern (``https://host/train-{00000..00127}.tar``, ``{a,b}`` lists too) or
by a list of paths / URLs (the index then defaults to ``index.json`` beside the first one).

HTTP(S) is read with the standard library, never hanging: every connect and every read has
``RetryPolicy.timeout_s``; a failed request, a timeout or a connection cut mid-shard is retried
``RetryPolicy.attempts`` times in all with exponential backoff (a cut shard resumes where it
stopped, with a ``Range`` request, or by re-reading and discarding when the server ignores
ranges); then a `DataError` names the URL, the last error and the attempts. A 4xx answer
(except 408 and 429) is final at once. Any other scheme (``s3://``, ``gs://``, ``hf://``,
``memory://``) goes through fsspec with the same retry loop; the filesystem package is the
user's to install (``s3fs``, ``gcsfs``, ...), and its absence is a one-line error.
"""
from __future__ import annotations

import http.client
import io
import itertools
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import BinaryIO, Callable, List, Sequence, Union

from llave_ds.data.errors import DataError
from llave_ds.data.shards.layout import INDEX_NAME

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_FINAL_HTTP = frozenset(range(400, 500)) - {408, 429}
_USER_AGENT = "llave-ds shards"


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try a remote shard: ``attempts`` tries in all (the first included), waiting
    ``backoff_s * 2**k`` (at most ``max_backoff_s``) before try k + 2; ``timeout_s`` bounds each
    connect and each read. The defaults give up after about 1 + 2 + 4 + 8 = 15 s of waiting."""
    attempts: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff_s < 0 or self.max_backoff_s < 0 or self.timeout_s <= 0:
            raise ValueError(f"RetryPolicy: attempts >= 1, backoffs >= 0 and timeout_s > 0 are required, got {self}")

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed try."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** (failures - 1))


# --------------------------------------------------------------------------- names

def is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def local_path(location: str) -> str:
    return os.path.expanduser(location[len("file://"):] if location.startswith("file://") else location)


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name if is_url(base) else os.path.join(local_path(base), name)


def parent(location: str) -> str:
    return location.rsplit("/", 1)[0] if is_url(location) else os.path.dirname(os.path.abspath(local_path(location)))


def basename(location: str) -> str:
    return location.rstrip("/").rsplit("/", 1)[-1] if is_url(location) else os.path.basename(local_path(location))


def expand_braces(pattern: str) -> List[str]:
    """Every name of a brace pattern, in order: ``{00000..00127}`` is a numeric range (zero
    padding kept: the width of the wider bound), ``{a,b,c}`` a list; several braces multiply."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = _RANGE.match(body)
    if numeric:
        lo, hi = (int(v) for v in numeric.groups())
        width = max(len(v.lstrip("-")) for v in numeric.groups()) if any(
            v.lstrip("-").startswith("0") for v in numeric.groups()) else 0
        step = 1 if hi >= lo else -1
        choices = [f"{'-' if v < 0 else ''}{abs(v):0{width}d}" for v in range(lo, hi + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise ValueError(f"brace pattern {pattern!r}: {{{body}}} is neither a range (a..b) nor a list (a,b)")
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [head + choice + rest for choice in choices for rest in expand_braces(tail)]


def shard_locations(source: Union[str, Sequence[str]], names: Sequence[str]) -> List[str]:
    """The location of each of the index's shards ``names`` in ``source``: a directory or URL
    prefix (the names joined to it), a brace pattern or a list (which must name the same
    shards, in the same order)."""
    if isinstance(source, str) and "{" not in source and not source.endswith(".tar"):
        return [join(source, name) for name in names]
    given = expand_braces(source) if isinstance(source, str) else list(
        itertools.chain.from_iterable(expand_braces(s) for s in source))
    found = [basename(g) for g in given]
    if found != list(names):
        raise DataError(f"the shards named ({len(given)}: {_few(found)}) are not the index's "
                        f"({len(names)}: {_few(names)}), in the same order")
    return given


def index_location(source: Union[str, Sequence[str]]) -> str:
    """Where ``index.json`` is by default: in the directory / URL prefix, or beside the first
    shard of a pattern or list."""
    if isinstance(source, str) and "{" not in source and not source.endswith(".tar"):
        return join(source, INDEX_NAME)
    first = expand_braces(source if isinstance(source, str) else source[0])[0]
    return join(parent(first), INDEX_NAME)


def _few(names: Sequence[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


# --------------------------------------------------------------------------- streams

def open_stream(location: str, policy: RetryPolicy = RetryPolicy(), *,
                sleep: Callable[[float], None] = time.sleep) -> BinaryIO:
    """A readable binary stream of ``location`` (local path, ``file://``, HTTP(S), fsspec)."""
    if not is_url(location):
        path = local_path(location)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise DataError(f"shard file not found: {path}", file=path) from None
        except OSError as exc:
            raise DataError(f"cannot open {path}: {exc.strerror or exc}", file=path) from None
    if location.startswith(("http://", "https://")):
        return io.BufferedReader(_HTTPStream(location, policy, sleep), buffer_size=1 << 20)
    return _retrying(location, policy, sleep, lambda: _open_fsspec(location))


def read_bytes(location: str, policy: RetryPolicy = RetryPolicy()) -> bytes:
    """The whole content of a small file (``index.json``)."""
    with open_stream(location, policy) as stream:
        return stream.read()


class _Final(Exception):
    """A failure that retrying cannot mend (404, a missing object)."""


def _retrying(location: str, policy: RetryPolicy, sleep: Callable[[float], None], fn, failures: int = 0):
    """``fn()``, tried until ``policy.attempts`` failures in all (``failures`` already spent)."""
    started = time.monotonic()
    while True:
        try:
            return fn()
        except _Final as exc:
            raise DataError(f"cannot fetch {location}: {exc}", file=location) from None
        except (OSError, http.client.HTTPException, TimeoutError) as exc:
            failures += 1
            if failures >= policy.attempts:
                raise DataError(f"cannot fetch {location}: {_describe(exc)} (gave up after {failures} attempts "
                                f"in {time.monotonic() - started:.1f} s; RetryPolicy: attempts={policy.attempts}, "
                                f"timeout_s={policy.timeout_s})", file=location) from None
            sleep(policy.delay(failures))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"{type(exc.reason).__name__}: {exc.reason}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _open_fsspec(location: str):
    try:
        import fsspec
        return fsspec.open(location, "rb").open()
    except FileNotFoundError as exc:
        raise _Final(f"not found ({exc})") from None
    except (ImportError, ValueError) as exc:
        # fsspec names the missing package ("Install s3fs to access S3") or the unknown protocol.
        raise _Final(f"no filesystem for it ({exc})") from None


class _HTTPStream(io.RawIOBase):
    """An HTTP(S) body that reconnects (``Range: bytes=pos-``) when a read fails."""

    def __init__(self, url: str, policy: RetryPolicy, sleep: Callable[[float], None]):
        super().__init__()
        self.url, self.policy, self.sleep = url, policy, sleep
        self.pos = 0
        self.end = None  # the body's end (a byte position), from Content-Length
        self.failures = 0
        self._response = _retrying(url, policy, sleep, lambda: self._request(0))

    def _request(self, pos: int):
        headers = {"User-Agent": _USER_AGENT}
        if pos:
            headers["Range"] = f"bytes={pos}-"
        try:
            response = urllib.request.urlopen(urllib.request.Request(self.url, headers=headers),
                                              timeout=self.policy.timeout_s)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code in _FINAL_HTTP:
                raise _Final(f"HTTP {exc.code} {exc.reason}") from None
            raise
        length = response.headers.get("Content-Length")
        skip = pos if pos and response.status != 206 else 0  # the server ignored the range: skip what was read
        # http.client ends a cut body quietly (readinto returns 0): the length tells a cut from the end.
        self.end = int(length) - skip + pos if length and length.isdigit() else None
        while skip:
            chunk = response.read(min(skip, 1 << 20))
            if not chunk:
                raise http.client.IncompleteRead(b"", skip)
            skip -= len(chunk)
        return response

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            try:
                n = self._response.readinto(buffer)
                if n == 0 and len(buffer) and self.end is not None and self.pos < self.end:
                    raise http.client.IncompleteRead(b"", self.end - self.pos)
                self.pos += n
                return n
            except (OSError, http.client.HTTPException) as exc:
                self.failures += 1
                if self.failures >= self.policy.attempts:
                    raise DataError(f"cannot fetch {self.url}: {_describe(exc)} at byte {self.pos} (gave up after "
                                    f"{self.failures} attempts; RetryPolicy: attempts={self.policy.attempts}, "
                                    f"timeout_s={self.policy.timeout_s})", file=self.url) from None
                self._response.close()
                self.sleep(self.policy.delay(self.failures))
                self._response = _retrying(self.url, self.policy, self.sleep, lambda: self._request(self.pos),
                                           failures=self.failures)

    def close(self) -> None:
        if not self.closed:
            self._response.close()
        super().close()

