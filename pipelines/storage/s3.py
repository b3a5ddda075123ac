"""S3 backend of pipelines.storage (boto3). Use pipelines.storage, not this module.

Retries, two layers, each bounded:
- every HTTP request (GET/PUT/HEAD/LIST and each multipart part): botocore "standard" mode, REQUEST_ATTEMPTS
  attempts, on throttling (SlowDown, 429), 500/502/503/504, RequestTimeout, connection errors and timeouts;
  truncated exponential backoff with full jitter, rand(0,1) * min(base * 2**i, 20 s), base 1 s for throttling
  and 50 ms otherwise. Each attempt is bounded by CONNECT_TIMEOUT / READ_TIMEOUT (10 s / 30 s), and no retry
  starts after RETRY_BUDGET_S (120 s) from the request's start: a hung store holds one request < 180 s
  (120 s + one attempt of 10 + 30 s + one backoff of <= 20 s).
- a body that breaks mid-stream (reset, timeout, short read) is past botocore's reach: the
  reader re-GETs with Range from the byte where it stopped and If-Match on the first ETag (so it
  never splices two versions), up to RESUME_ATTEMPTS times without progress, with full-jitter backoff.
Errors that are not transient (NoSuchKey, AccessDenied, InvalidAccessKeyId, NoSuchBucket...) are turned
into one StorageError at once. GETs, bytes and retries are counted in pipelines/storage/traffic.py.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import tempfile
import threading
import time

import boto3
import urllib3.exceptions
from boto3.s3.transfer import TransferConfig
from botocore import exceptions as bexc
from botocore.config import Config

from pipelines.storage import traffic
from pipelines.storage.errors import StorageError, StorageNotFoundError

MB = 1 << 20
READ_BUFFER = MB  # open_read's buffer: a reader's GET body is read this much at a time (read-ahead)
MULTIPART_THRESHOLD = 64 * MB  # below: one PUT; above: parts uploaded in parallel
PART_SIZE = 16 * MB  # s3transfer raises it when 10,000 parts would not fit, and to >= 5 MiB
MAX_CONCURRENCY = 8  # parts in flight per upload
READ_GRAIN = MB
# One body.read(): a read that breaks loses what it had received in that call, so a resume
# restarts at most this far back. Reading a 128 MiB object from local SeaweedFS
# (2-core box): 64 KiB 405 MB/s, 256 KiB 457, 1 MiB 471, 4 MiB 499, 16 MiB 427: 1 MiB costs ~nothing.
REQUEST_ATTEMPTS = int(os.environ.get("CROSSMAE_S3_ATTEMPTS", "8"))  # per request, incl. the first
# Per attempt: a connect that takes 10 s, or 30 s without a byte of the answer, is a hung store
# (a frozen server still completes TCP handshakes from the kernel's backlog, so only the read
# timeout notices it). 60 s x 8 attempts kept one request waiting 422 s (issue 13.6); a healthy
# store answers a 16 MiB part PUT in well under a second (local SeaweedFS).
CONNECT_TIMEOUT = float(os.environ.get("CROSSMAE_S3_CONNECT_TIMEOUT", "10"))
READ_TIMEOUT = float(os.environ.get("CROSSMAE_S3_READ_TIMEOUT", "30"))
# Per request, all attempts together: no retry starts after this many seconds, so one request
# ends within RETRY_BUDGET_S + one attempt (connect + read timeout) + one backoff (<= 20 s).
RETRY_BUDGET_S = float(os.environ.get("CROSSMAE_S3_RETRY_BUDGET_S", "120"))
RESUME_ATTEMPTS = int(os.environ.get("CROSSMAE_S3_RESUME_ATTEMPTS", "8"))  # per stall of a read
BACKOFF_BASE, BACKOFF_CAP = 0.1, 10.0  # seconds, for resumes

_STREAM_ERRORS = (bexc.ResponseStreamingError, bexc.IncompleteReadError, bexc.ReadTimeoutError,
                  bexc.ConnectionClosedError, bexc.EndpointConnectionError, bexc.ConnectTimeoutError,
                  urllib3.exceptions.ProtocolError, urllib3.exceptions.ReadTimeoutError,
                  ConnectionError, TimeoutError)
_AUTH_CAUSES = {
    "InvalidAccessKeyId": "the access key ID is not known to the endpoint",
    "SignatureDoesNotMatch": "the secret key does not match the access key ID",
    "AccessDenied": "access denied",
    "403": "access denied (wrong credentials or no permission)",
    "ExpiredToken": "the session token has expired",
    "InvalidToken": "the session token is invalid",
}


def endpoint_url() -> str | None:
    return (os.environ.get("CROSSMAE_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or None)


def _env_key() -> tuple:
    # Clients are cached; a change of credentials/region in the environment (a test, a
    # re-configured job) must get a new client. Secrets enter the key only as hashes.
    h = lambda name: hashlib.sha256(os.environ.get(name, "").encode()).hexdigest()[:16]  # noqa: E731
    plain = ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_DEFAULT_REGION", "AWS_REGION", "CROSSMAE_S3_ADDRESSING")
    return (*(os.environ.get(n) for n in plain), h("AWS_SECRET_ACCESS_KEY"), h("AWS_SESSION_TOKEN"))


_local = threading.local()


def client(endpoint: str | None = None):
    """The S3 client for this (endpoint, environment, thread, process). boto3 sessions are not
    thread-safe and no client survives fork (its pooled sockets are shared with the parent), so
    the cache is per thread and is dropped when os.getpid() changes."""
    endpoint = endpoint or endpoint_url()
    if getattr(_local, "pid", None) != os.getpid():
        _local.pid, _local.clients = os.getpid(), {}
    key = (endpoint, _env_key(), REQUEST_ATTEMPTS, CONNECT_TIMEOUT, READ_TIMEOUT, RETRY_BUDGET_S)
    c = _local.clients.get(key)
    if c is None:
        # Standard credential chain (env, ~/.aws, SSO, instance role). botocore >= 1.36 also
        # sends CRC32 checksums by default: SeaweedFS 4.48 accepts them; for an older S3 clone
        # set AWS_REQUEST_CHECKSUM_CALCULATION=when_required (botocore reads it).
        session = boto3.session.Session()
        style = os.environ.get("CROSSMAE_S3_ADDRESSING") or ("path" if endpoint else "auto")
        cfg = Config(region_name=session.region_name or "us-east-1", s3={"addressing_style": style},
                     retries={"mode": "standard", "total_max_attempts": REQUEST_ATTEMPTS},
                     connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT,
                     max_pool_connections=MAX_CONCURRENCY + 2)
        c = _local.clients[key] = session.client("s3", endpoint_url=endpoint, config=cfg)
        _bound_retry_time(c, RETRY_BUDGET_S)
    return c


def _bound_retry_time(c, budget_s: float) -> None:
    """No retry after ``budget_s`` seconds since the request started. botocore has no such
    setting: a handler registered first on needs-retry answers False (= do not retry) once the
    deadline has passed; endpoint._needs_retry takes the first answer that is not None."""
    def start(context, **_):
        context["crossmae_retry_deadline"] = time.monotonic() + budget_s

    def stop_after_deadline(request_dict, **_):
        deadline = request_dict.get("context", {}).get("crossmae_retry_deadline")
        return False if deadline is not None and time.monotonic() >= deadline else None

    c.meta.events.register_first("before-call.s3", start, unique_id="crossmae-retry-deadline-start")
    c.meta.events.register_first("needs-retry.s3", stop_after_deadline, unique_id="crossmae-retry-deadline")


def _redact(text: str) -> str:
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def _code_status(e: Exception) -> tuple[str, int]:
    if isinstance(e, bexc.ClientError):
        meta = e.response.get("ResponseMetadata", {})
        return str(e.response.get("Error", {}).get("Code", "")), int(meta.get("HTTPStatusCode") or 0)
    return "", 0


def error(url: str, e: Exception, action: str) -> StorageError:
    """One StorageError line for a boto3/botocore failure."""
    code, status = _code_status(e)
    where = client().meta.endpoint_url
    if status >= 500 or status == 429 or not isinstance(e, bexc.ClientError):
        # botocore's standard mode keeps a retry quota per client (500 tokens, 14 per retry of an
        # error, 5 of a throttle, 1 back per success): a few requests that failed after all their
        # retries drain it, and then every later transient error fails at its first attempt.
        _local.clients = {}
    if isinstance(e, bexc.ClientError):
        if code in ("NoSuchKey", "404", "NotFound"):
            return StorageNotFoundError(f"{url}: no such object ({code or 'NotFound'}, HTTP {status or 404})", url)
        if code in _AUTH_CAUSES:
            msg = (f"{url}: {action} refused by {where}: {_AUTH_CAUSES[code]} ({code}, HTTP {status}); "
                   f"check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE and the bucket policy")
        elif code == "NoSuchBucket":
            msg = f"{url}: bucket does not exist at {where} (NoSuchBucket, HTTP {status})"
        else:
            server = e.response.get("Error", {}).get("Message", "")
            msg = f"{url}: {action} failed: {code} (HTTP {status}){': ' + server if server else ''}"
    elif isinstance(e, bexc.NoCredentialsError):
        msg = f"{url}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
    elif isinstance(e, (bexc.EndpointConnectionError, bexc.ConnectTimeoutError)):
        msg = f"{url}: cannot connect to S3 endpoint {where} ({type(e).__name__})"
    else:
        msg = f"{url}: {action} failed: {type(e).__name__}: {e}"
    return StorageError(_redact(msg), url)


def _backoff(failures: int) -> None:
    traffic.count(retries=1)  # a GET is sent again (pipelines/storage/traffic.py)
    time.sleep(random.random() * min(BACKOFF_CAP, BACKOFF_BASE * 2 ** failures))  # full jitter


class S3Reader(io.RawIOBase):
    """Raw seekable reader of bytes [start, end) of one object that survives broken bodies."""

    def __init__(self, url: str, bucket: str, key: str, start: int = 0, end: int | None = None):
        super().__init__()
        self.url, self.bucket, self.key = url, bucket, key
        self._pos, self._end = start, end
        self._body, self._etag, self._size, self._stop = None, None, None, None

    def readable(self) -> bool:
        return True

    seekable = readable

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos}.get(whence)
        if base is None:
            base = self._size if self._size is not None else size(self.url, self.bucket, self.key)
        new = base + offset
        if new < 0:
            raise ValueError(f"negative seek position {new}")
        if new != self._pos:
            self._drop()
            self._pos = new
        return new

    def _drop(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):
                self._body.close()
            self._body = None

    def _open(self) -> bool:
        """GET from self._pos; False when there is nothing left (past the end)."""
        end = self._size if self._end is None else self._end  # known end: no GET that can only answer 416
        if end is not None and self._pos >= end:
            return False
        kw = {"Bucket": self.bucket, "Key": self.key, **({"IfMatch": self._etag} if self._etag else {})}
        if self._pos or self._end is not None:
            kw["Range"] = f"bytes={self._pos}-{'' if self._end is None else self._end - 1}"
        try:
            traffic.count(gets=1)
            resp = client().get_object(**kw)
        except bexc.ClientError as e:
            code, status = _code_status(e)
            # by status too: a damaged error body leaves botocore only the status as the code
            if code == "InvalidRange" or status == 416:  # start at or past the end: an empty read, like a slice
                return False
            if code == "PreconditionFailed" or status == 412:
                raise StorageError(f"{self.url}: object was replaced while being read (ETag {self._etag} "
                                   f"no longer matches at byte {self._pos})", self.url) from e
            raise
        self._body = resp["Body"]
        traffic.count(gets=(n := resp["ResponseMetadata"].get("RetryAttempts", 0)), retries=n)  # botocore's
        if "Range" in kw and not resp.get("ContentRange", "").startswith(f"bytes {self._pos}-"):
            # A 200 with the whole object: splicing it in at self._pos would corrupt the read.
            self._drop()
            raise StorageError(f"{self.url}: server ignored the Range header (asked {kw['Range']}, got "
                               f"{resp.get('ContentRange') or 'the whole object'})", self.url)
        self._etag = self._etag or resp.get("ETag")
        total = resp.get("ContentRange", "").rpartition("/")[2]
        self._size = int(total) if total.isdigit() else self._pos + resp["ContentLength"]
        self._stop = self._pos + resp["ContentLength"]
        return True

    def ensure_open(self) -> bool:
        """Start the GET now (so a missing object fails at open_read, not at the first read)."""
        if self._body is not None:
            return True
        failures = 0
        while True:
            try:
                return self._open()
            except StorageError:
                raise
            except (urllib3.exceptions.ProtocolError, urllib3.exceptions.ReadTimeoutError) as e:
                # an error answer's body broke off: botocore reads the error body of a streaming
                # operation (GetObject) outside its retry loop (endpoint.convert_to_response_dict)
                failures += 1
                if failures >= RESUME_ATTEMPTS:
                    raise error(self.url, e, "read") from e
                _backoff(failures)
            except Exception as e:  # botocore has already retried this request if it could
                raise error(self.url, e, "read") from e

    def _chunk(self, n: int) -> bytes:
        """Up to n bytes at self._pos (b'' only at the end), re-GETting through broken bodies."""
        failures = 0
        while True:
            if self._body is None and not self.ensure_open():
                return b""
            try:
                data = self._body.read(min(n, READ_GRAIN))
                if not data and self._pos < self._stop:  # EOF before Content-Length: truncated
                    raise bexc.IncompleteReadError(actual_bytes=self._pos, expected_bytes=self._stop)
            except _STREAM_ERRORS as e:
                self._drop()
                failures += 1
                if failures >= RESUME_ATTEMPTS:
                    raise StorageError(f"{self.url}: read failed at byte {self._pos} after {failures} "
                                       f"attempts: {type(e).__name__}: {e}", self.url) from e
                _backoff(failures)
                continue
            except Exception as e:
                self._drop()
                raise error(self.url, e, "read") from e
            if not data:
                self._drop()
            traffic.count(bytes=len(data))
            self._pos += len(data)
            return data

    def readinto(self, b) -> int:
        data = self._chunk(len(b))
        b[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        out = bytearray()
        while data := self._chunk(READ_GRAIN):
            out += data
        return bytes(out)

    def close(self) -> None:
        self._drop()
        super().close()


def read(url, bucket, key, start, end) -> bytes:
    return S3Reader(url, bucket, key, start, end).readall()  # readall closes the body at the end


def open_read(url, bucket, key, start):
    raw = S3Reader(url, bucket, key, start)
    raw.ensure_open()
    return io.BufferedReader(raw, buffer_size=READ_BUFFER)


def _transfer(threshold, part_size) -> TransferConfig:
    return TransferConfig(multipart_threshold=threshold or MULTIPART_THRESHOLD,
                          multipart_chunksize=part_size or PART_SIZE, max_concurrency=MAX_CONCURRENCY)


def _upload(url, bucket, key, fileobj, threshold, part_size) -> None:
    # PUT and CompleteMultipartUpload are atomic on S3: readers see the old object or the new
    # one. On failure s3transfer aborts the multipart upload, so no parts are left billed.
    try:
        client().upload_fileobj(fileobj, bucket, key, Config=_transfer(threshold, part_size))
    except Exception as e:
        raise error(url, e, "write") from e


def write(url, bucket, key, data, threshold, part_size) -> None:
    if len(data) < (threshold or MULTIPART_THRESHOLD):
        try:
            client().put_object(Bucket=bucket, Key=key, Body=bytes(data))
        except Exception as e:
            raise error(url, e, "write") from e
    else:
        _upload(url, bucket, key, io.BytesIO(data), threshold, part_size)


@contextlib.contextmanager
def open_write(url, bucket, key, threshold, part_size):
    # Spool, then upload at exit: boto3 has no "abort if the writer fails" for a streamed
    # upload, and a spool makes every part re-sendable. Small objects stay in memory; large
    # ones go to a temp file (CROSSMAE_SPOOL_DIR or TMPDIR): needs free disk = object size.
    spool = tempfile.SpooledTemporaryFile(max_size=min(threshold or MULTIPART_THRESHOLD, 64 * MB),
                                          dir=os.environ.get("CROSSMAE_SPOOL_DIR"))
    with spool:
        yield spool
        spool.seek(0)
        _upload(url, bucket, key, spool, threshold, part_size)


def _head(url, bucket, key) -> dict:
    try:
        return client().head_object(Bucket=bucket, Key=key)
    except Exception as e:
        raise error(url, e, "stat") from e


def exists(url, bucket, key) -> bool:
    try:
        _head(url, bucket, key)
        return True
    except StorageNotFoundError:  # HEAD has no body, so a missing bucket is a bare 404 too
        return False


def size(url, bucket, key) -> int:
    return _head(url, bucket, key)["ContentLength"]


def delete(url, bucket, key) -> None:
    try:
        client().delete_object(Bucket=bucket, Key=key)
    except Exception as e:
        raise error(url, e, "delete") from e


def list_objects(bucket, prefix):
    url = f"s3://{bucket}/{prefix}"
    try:
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", ()):
                if not obj["Key"].endswith("/"):  # console "folder" markers are not objects
                    yield f"s3://{bucket}/{obj['Key']}", obj["Size"]
    except Exception as e:
        raise error(url, e, "list") from e


def abort_partial_uploads(url, bucket, key) -> int:
    """Abort multipart uploads of this key left by a killed writer (invisible, but billed)."""
    try:
        uploads = client().list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", [])
        mine = [u for u in uploads if u["Key"] == key]
        for u in mine:
            client().abort_multipart_upload(Bucket=bucket, Key=key, UploadId=u["UploadId"])
        return len(mine)
    except Exception as e:
        raise error(url, e, "abort multipart uploads") from e
