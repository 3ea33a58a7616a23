"""Blob backends under the artifact store: a local directory and S3, same key layout.

A backend knows nothing about digests or manifests; it moves bytes under keys.
Writes are atomic per key (a reader sees the whole object or none of it).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import unquote

from steps.core.errors import ObjectMissing, StoreError

CHUNK = 8 * 1024 * 1024


class HashingWriter:
    """A write-only file that hashes what passes through it.

    Having no `seek`, it makes boto3 fetch ranges in parallel but hand them over in
    order, so the hash is ready when the last byte lands.
    """

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.out.write(data)


@contextmanager
def written_atomically(dest: Path) -> Iterator[HashingWriter]:
    """Write `dest` through a temp file renamed into place only on success."""
    tmp = dest.with_name(f".partial-{dest.name}")
    try:
        with open(tmp, "wb") as out:
            yield HashingWriter(out)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def check_key(key: str) -> str:
    """Return `key` if it stays inside the store, else raise StoreError.

    The percent-decoded key is checked too: `%2e%2e/x` is a plain name here, but `..` to
    anything (an HTTP server, a UI link) that decodes it.
    """
    for form in dict.fromkeys((key, unquote(key))):
        if not form or form.startswith("/") or "\\" in form or "\x00" in form:
            raise StoreError(f"artifact key {key!r} is not a relative POSIX path")
        parts = form.split("/")
        if any(part in ("", ".", "..") for part in parts) or ":" in parts[0]:
            raise StoreError(f"artifact key {key!r} escapes the store")
    return key


# What S3 servers answer a conditional put whose key exists (or is being written).
EXISTS_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


class Backend(Protocol):
    url: str

    def put_file(self, key: str, source: Path) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def put_bytes_if_absent(self, key: str, data: bytes) -> bool: ...
    def get_file(self, key: str, dest: Path) -> str: ...
    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def iter_chunks(self, key: str) -> Iterator[bytes]: ...
    def list(self, prefix: str) -> Iterator[str]: ...
    def delete(self, key: str) -> None: ...


class LocalBackend:
    """Objects as files under a root directory; atomic by write-to-temp then rename."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        self.url = self.root.as_uri()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create local store at {self.root}: {exc.strerror}") from exc

    def _path(self, key: str) -> Path:
        key = check_key(key)
        path = self.root / key
        # A symlink planted inside the store must not lead out of it.
        if self._through_link(key) and not path.resolve().is_relative_to(self.root):
            raise StoreError(f"artifact key {key!r} resolves outside the store {self.root}")
        return path

    def _through_link(self, key: str) -> bool:
        """Whether a component of the key's path inside the store is a symlink. The root is
        resolved already, so only these can lead elsewhere; a few lstat calls cost far less
        than resolving the whole path, on every read of a large store."""
        current = str(self.root)
        for name in key.split("/"):
            current = f"{current}/{name}"
            try:
                mode = os.lstat(current).st_mode
            except OSError:
                return False  # nothing below exists (or can be reached) to lead anywhere
            if stat.S_ISLNK(mode):
                return True
        return False

    def _write_atomically(self, key: str, write, *, overwrite: bool = True) -> bool:
        """Write to a temp file, then move it into place; False if it existed and must stay."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
        try:
            with os.fdopen(fd, "wb") as out:
                write(out)
                out.flush()
                os.fsync(out.fileno())
            if overwrite:
                os.replace(tmp, path)
                return True
            try:
                os.link(tmp, path)  # atomic, and fails where the key already exists
            except FileExistsError:
                return False
            finally:
                Path(tmp).unlink(missing_ok=True)
            return True
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise StoreError(f"cannot write {key} in {self.root}: {exc.strerror}") from exc
            raise

    def put_file(self, key: str, source: Path) -> None:
        def copy(out):
            with open(source, "rb") as src:
                shutil.copyfileobj(src, out, CHUNK)

        self._write_atomically(key, copy)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write_atomically(key, lambda out: out.write(data))

    def put_bytes_if_absent(self, key: str, data: bytes) -> bool:
        return self._write_atomically(key, lambda out: out.write(data), overwrite=False)

    def get_file(self, key: str, dest: Path) -> str:
        try:
            with open(self._path(key), "rb") as source, written_atomically(dest) as writer:
                shutil.copyfileobj(source, writer, CHUNK)
            return writer.sha256.hexdigest()
        except FileNotFoundError as exc:
            raise StoreError(f"object {key} is missing from {self.root}") from exc
        except OSError as exc:  # disk full, file too large, no permission at dest
            raise StoreError(f"cannot copy {key} from {self.root} to {dest}: "
                             f"{exc.strerror}") from exc

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise ObjectMissing(f"object {key} is missing from {self.root}") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        """The object's bytes, a chunk at a time (memory stays flat)."""
        try:
            with open(self._path(key), "rb") as source:
                while chunk := source.read(CHUNK):
                    yield chunk
        except FileNotFoundError as exc:
            raise ObjectMissing(f"object {key} is missing from {self.root}") from exc

    def list(self, prefix: str) -> Iterator[str]:
        # os.walk reads each directory once (no stat per file): a 100,000-manifest store
        # lists in a fraction of a second.
        keys = []
        for folder, _, names in os.walk(self.root / prefix):
            where = Path(folder).relative_to(self.root).as_posix()
            keys.extend(f"{where}/{name}" for name in names if not name.startswith(".partial-"))
        yield from sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class S3Backend:
    """Objects in an S3 bucket under an optional prefix, through boto3.

    Endpoint, region and credentials come from the environment only
    (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
    Large files go up as multipart uploads, which S3 makes visible only on completion.
    """

    list_page_size = 1000  # keys per listing request (S3's most)

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
            "AWS_ENDPOINT_URL"
        )
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        config = Config(
            signature_version="s3v4",
            retries={"max_attempts": int(os.environ.get("TAILWISE_S3_MAX_ATTEMPTS", "5")),
                     "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
            # Self-hosted servers (MinIO, nanio, moto) are reached by path, not by bucket DNS.
            s3={"addressing_style": "path" if self.endpoint_url else "auto"},
        )
        # A session of our own: boto3's default session caches the first credentials it saw.
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
            or "us-east-1",
            config=config,
        )
        # boto3's defaults: 8 MB parts, 10 threads; multipart uploads appear only when complete.
        self.transfer = TransferConfig()

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self) -> str:
        return f"bucket {self.bucket!r} at {self.endpoint_url or 'AWS S3'}"

    def _error(self, action: str, key: str, exc: Exception) -> StoreError:
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        if isinstance(exc, EndpointConnectionError):
            return StoreError(f"cannot reach the S3 endpoint {self.endpoint_url} "
                              f"(bucket {self.bucket!r}): is the server running?")
        if isinstance(exc, NoCredentialsError):
            return StoreError(f"no S3 credentials for {self._where()}: "
                              "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code == "NoSuchBucket":
                return StoreError(f"{self._where()} does not exist")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
                return StoreError(f"S3 refused the credentials for {self._where()} ({code})")
            if code in ("NoSuchKey", "404"):
                return ObjectMissing(f"object {key} is missing from {self._where()}")
            return StoreError(f"S3 {action} of {key} in {self._where()} failed: {code or exc}")
        return StoreError(f"S3 {action} of {key} in {self._where()} failed: {exc}")

    def _call(self, action: str, key: str, fn, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise self._error(action, key, exc) from exc
        except Exception as exc:  # boto3's transfer manager re-raises as its own types
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, (BotoCoreError, ClientError)):
                raise self._error(action, key, cause) from exc
            raise

    def put_file(self, key: str, source: Path) -> None:
        self._call("upload", key, self.client.upload_file, str(source), self.bucket,
                   self._key(key), Config=self.transfer)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call("upload", key, self.client.put_object, Bucket=self.bucket,
                   Key=self._key(key), Body=data)

    def put_bytes_if_absent(self, key: str, data: bytes) -> bool:
        """A conditional put (If-None-Match: *). Servers that ignore the condition overwrite;
        the store reads the object back, so both writers end up with what stayed."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                   IfNoneMatch="*")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in EXISTS_CODES:
                return False
            raise self._error("upload", key, exc) from exc
        except BotoCoreError as exc:
            raise self._error("upload", key, exc) from exc
        return True

    def get_file(self, key: str, dest: Path) -> str:
        # Hashed on the way in: verifying costs no second read of the file.
        try:
            with written_atomically(dest) as writer:
                self._call("download", key, self.client.download_fileobj, self.bucket,
                           self._key(key), writer, Config=self.transfer)
        except OSError as exc:  # disk full, file too large, no permission at dest
            raise StoreError(f"cannot download {key} from {self._where()} to {dest}: "
                             f"{exc.strerror or exc}") from exc
        return writer.sha256.hexdigest()

    def get_bytes(self, key: str) -> bytes:
        response = self._call("download", key, self.client.get_object, Bucket=self.bucket,
                              Key=self._key(key))
        return response["Body"].read()

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._error("lookup", key, exc) from exc
        except Exception as exc:
            raise self._error("lookup", key, exc) from exc

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        """The object's bytes, streamed in chunks (memory stays flat)."""
        response = self._call("download", key, self.client.get_object, Bucket=self.bucket,
                              Key=self._key(key))
        yield from response["Body"].iter_chunks(CHUNK)

    def list(self, prefix: str) -> Iterator[str]:
        """The keys under `prefix`, a page at a time: a store of any size lists in the
        memory of one page."""
        paginator = self.client.get_paginator("list_objects_v2")
        full = self._key(prefix.rstrip("/")) + "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        pages = iter(paginator.paginate(Bucket=self.bucket, Prefix=full,
                                        PaginationConfig={"PageSize": self.list_page_size}))
        while (page := self._call("listing", prefix, next, pages, None)) is not None:
            for item in page.get("Contents", []):
                yield item["Key"][strip:]

    def delete(self, key: str) -> None:
        self._call("delete", key, self.client.delete_object, Bucket=self.bucket,
                   Key=self._key(key))


def backend_from_url(url: str) -> Backend:
    """`s3://bucket/prefix` or a local path / `file://` URL."""
    if "\x00" in url:
        raise StoreError(f"store URL {url!r} holds a NUL byte")
    if url.startswith("s3://"):
        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not bucket:
            raise StoreError(f"store URL {url!r} names no bucket")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", bucket) or ".." in bucket:
            raise StoreError(f"store URL {url!r}: {bucket!r} is not an S3 bucket name")
        if prefix.strip("/"):
            check_key(prefix.strip("/"))  # no `..`, `%2e%2e` or `\` in the prefix
        return S3Backend(bucket, prefix)
    if url.startswith("file://"):
        url = url[len("file://"):]
        if not url.startswith("/"):  # file://etc/x would silently mean ./etc/x
            raise StoreError(f"store URL 'file://{url}': a file URL needs an absolute path "
                             "(file:///...)")
    if "://" in url:
        raise StoreError(f"store URL {url!r}: use s3://bucket/prefix or a local directory")
    return LocalBackend(url)
