"""Storage URIs: a local path, `file://path` or `s3://bucket/prefix`, behind one small API.

S3 goes through boto3 (no AWS CLI needed): the endpoint comes from `AWS_ENDPOINT_URL_S3` /
`AWS_ENDPOINT_URL` (MinIO, Ceph, moto), credentials from the usual AWS chain and are never logged.
Checksums are only computed "when required", which S3-compatible stores need since botocore 1.36.
A file becomes visible only when complete: local writes go to a temporary name, are fsynced and
renamed; an S3 object appears only when its (multipart) upload completes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

from .errors import UserError

MULTIPART_CHUNK = 64 * 1024 * 1024


class StorageError(UserError):
    """A storage location that cannot be read or written, with the reason."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Storage(ABC):
    """A folder of named objects (names use '/' separators) on local disk or S3."""

    uri: str

    def url(self, name: str) -> str:
        return f"{self.uri.rstrip('/')}/{name}"

    def exists(self, name: str) -> bool:
        return self.size(name) is not None

    def found(self) -> bool:
        """Whether the folder itself is there: on S3, whether any object has its prefix."""
        return bool(self.list())

    @abstractmethod
    def size(self, name: str) -> int | None:
        """Size in bytes, or None when the object does not exist."""
        ...

    @abstractmethod
    def read_bytes(self, name: str) -> bytes:
        ...

    @abstractmethod
    def write_bytes(self, name: str, data: bytes) -> None:
        ...

    @abstractmethod
    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Write `name` only if it does not exist, atomically against other writers; False when it does."""
        ...

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove `name`; nothing when it does not exist."""
        ...

    @abstractmethod
    def upload(self, local_path: Path, name: str, sha256: str) -> None:
        """Copy a finished local file to `name`; its sha256 is kept so a later run can verify it."""
        ...

    @abstractmethod
    def stored_sha256(self, name: str) -> str | None:
        ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Names under `prefix`, sorted."""
        ...

    @abstractmethod
    def open_read(self, name: str) -> BinaryIO:
        ...

    @abstractmethod
    def check_writable(self) -> None:
        """Raise StorageError unless an object can be written and deleted here."""
        ...


class LocalStorage(Storage):
    def __init__(self, root: Path):
        self.root = root
        self.uri = str(root)

    def _path(self, name: str) -> Path:
        return self.root / name

    def found(self) -> bool:
        return self.root.is_dir()

    def size(self, name: str) -> int | None:
        path = self._path(name)
        return path.stat().st_size if path.is_file() else None

    def read_bytes(self, name: str) -> bytes:
        return self._path(name).read_bytes()

    def _atomic_write(self, name: str, write) -> None:
        target = self._path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                # The bytes reach the disk before the name does: after a power loss the manifest is the old
                # one or the new one, never a new name on empty or partial content.
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; datasets are read by other users and nodes
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_folder(target.parent)  # the rename itself is durable only once its folder is

    def write_bytes(self, name: str, data: bytes) -> None:
        self._atomic_write(name, lambda f: f.write(data))

    def create_exclusive(self, name: str, data: bytes) -> bool:
        target = self._path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _fsync_folder(target.parent)
        return True

    def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def upload(self, local_path: Path, name: str, sha256: str) -> None:
        def copy(f):
            with open(local_path, "rb") as src:
                while block := src.read(1 << 20):
                    f.write(block)

        self._atomic_write(name, copy)

    def stored_sha256(self, name: str) -> str | None:
        path = self._path(name)
        return sha256_file(path) if path.is_file() else None

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*")
                      if p.is_file() and not p.name.startswith("."))

    def open_read(self, name: str) -> BinaryIO:
        return open(self._path(name), "rb")

    def check_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / _probe_name()
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise StorageError(f"output {self.uri} is not writable: {error.strerror or error}") from None


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _probe_name() -> str:
    # One name per writer: two jobs probing one output at once never delete each other's probe.
    return f".ddpm-write-probe-{uuid.uuid4().hex}"


_clients = threading.local()


def s3_endpoint() -> str | None:
    """The S3 endpoint of MinIO, Ceph or moto (AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL); None for AWS."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def storage_filesystem(uri: str):
    """A pyarrow filesystem for s3:// `uri` on the endpoint and region boto3 uses (Ray Train's checkpoints);
    None where pyarrow's own resolution is right (local paths, AWS itself)."""
    endpoint = s3_endpoint()
    if not uri.startswith("s3://") or not endpoint:
        return None
    import pyarrow.fs

    return pyarrow.fs.S3FileSystem(endpoint_override=endpoint, scheme=endpoint.split("://")[0], region=s3_region())


def s3_client():
    """One boto3 S3 client per process and thread (clients must never cross processes).

    Rebuilt when the endpoint or credentials in the environment change (rotated keys, tests).
    """
    endpoint = s3_endpoint()
    identity = (os.getpid(), endpoint, os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_PROFILE"))
    if getattr(_clients, "identity", None) != identity:
        import boto3
        from botocore.config import Config

        config = Config(
            retries={"mode": "standard"},  # 3 attempts unless AWS_MAX_ATTEMPTS says otherwise
            connect_timeout=10,
            read_timeout=120,
            max_pool_connections=32,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"} if endpoint else {},
        )
        _clients.client = boto3.client("s3", endpoint_url=endpoint, region_name=s3_region(), config=config)
        _clients.identity = identity
    return _clients.client


def describe_s3_error(error: Exception, uri: str) -> str:
    """One line saying what went wrong with S3 at `uri`, never including credentials."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(error, NoCredentialsError):
        return f"no AWS credentials found for {uri} (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)"
    if isinstance(error, EndpointConnectionError):
        return f"cannot reach the S3 endpoint for {uri}: {error}"
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            return f"S3 rejected the credentials for {uri} ({code})"
        if code in ("AccessDenied", "403", "Forbidden"):
            return f"access denied to {uri} ({code})"
        if code in ("NoSuchBucket", "404", "NotFound"):
            return f"the bucket of {uri} does not exist"
        return f"S3 error for {uri}: {code or error}"
    return f"S3 error for {uri}: {error}"


class S3Storage(Storage):
    def __init__(self, bucket: str, prefix: str):
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _head(self, name: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return s3_client().head_object(Bucket=self.bucket, Key=self._key(name))
        except Exception as error:  # noqa: BLE001 - no credentials, no endpoint: one line naming the object
            if isinstance(error, ClientError) and error.response.get("Error", {}).get("Code") in (
                    "404", "NoSuchKey", "NotFound"):
                return None
            raise StorageError(describe_s3_error(error, self.url(name))) from None

    def size(self, name: str) -> int | None:
        head = self._head(name)
        return None if head is None else head["ContentLength"]

    def read_bytes(self, name: str) -> bytes:
        with self.open_read(name) as body:
            return body.read()

    def write_bytes(self, name: str, data: bytes) -> None:
        try:
            s3_client().put_object(Bucket=self.bucket, Key=self._key(name), Body=data)
        except Exception as error:  # noqa: BLE001 - reported as one line naming the object
            raise StorageError(describe_s3_error(error, self.url(name))) from None

    def create_exclusive(self, name: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            # S3's conditional write: refused with 412 (409 when another conditional write races it)
            # whenever the key exists, so of two writers exactly one creates it.
            s3_client().put_object(Bucket=self.bucket, Key=self._key(name), Body=data, IfNoneMatch="*")
        except Exception as error:  # noqa: BLE001 - reported as one line naming the object
            if isinstance(error, ClientError) and error.response.get("Error", {}).get("Code") in (
                    "PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise StorageError(describe_s3_error(error, self.url(name))) from None
        return True

    def delete(self, name: str) -> None:
        try:
            s3_client().delete_object(Bucket=self.bucket, Key=self._key(name))
        except Exception as error:  # noqa: BLE001
            raise StorageError(describe_s3_error(error, self.url(name))) from None

    def upload(self, local_path: Path, name: str, sha256: str) -> None:
        from boto3.s3.transfer import TransferConfig

        transfer = TransferConfig(multipart_threshold=MULTIPART_CHUNK, multipart_chunksize=MULTIPART_CHUNK,
                                  max_concurrency=8)
        try:
            s3_client().upload_file(str(local_path), self.bucket, self._key(name), Config=transfer,
                                    ExtraArgs={"Metadata": {"sha256": sha256}})
        except Exception as error:  # noqa: BLE001
            raise StorageError(describe_s3_error(error, self.url(name))) from None

    def stored_sha256(self, name: str) -> str | None:
        head = self._head(name)
        return None if head is None else head.get("Metadata", {}).get("sha256")

    def list(self, prefix: str = "") -> list[str]:
        names = []
        start = self._key(prefix)
        try:
            for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
                for item in page.get("Contents", []):
                    names.append(item["Key"][len(self.prefix) + 1:] if self.prefix else item["Key"])
        except Exception as error:  # noqa: BLE001
            raise StorageError(describe_s3_error(error, self.url(prefix))) from None
        return sorted(names)

    def open_read(self, name: str) -> BinaryIO:
        try:
            return s3_client().get_object(Bucket=self.bucket, Key=self._key(name))["Body"]
        except Exception as error:  # noqa: BLE001
            raise StorageError(describe_s3_error(error, self.url(name))) from None

    def check_writable(self) -> None:
        probe = self._key(_probe_name())
        try:
            # A PUT, not a HEAD: its error body says why (NoSuchBucket, InvalidAccessKeyId, AccessDenied).
            s3_client().put_object(Bucket=self.bucket, Key=probe, Body=b"")
            s3_client().delete_object(Bucket=self.bucket, Key=probe)
        except Exception as error:  # noqa: BLE001
            raise StorageError(describe_s3_error(error, self.uri)) from None


def open_storage(uri: str | os.PathLike) -> Storage:
    """The storage behind a local path, `file://` URI or `s3://bucket/prefix`."""
    text = os.fspath(uri)
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"S3 URI {text!r} has no bucket; expected s3://bucket/prefix")
        return S3Storage(parsed.netloc, parsed.path)
    if parsed.scheme == "file":
        return LocalStorage(Path(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter is a Windows drive
        raise StorageError(f"unsupported storage URI {text!r}; use a local path, file:// or s3://")
    return LocalStorage(Path(text).expanduser().resolve())


def read_uri(uri: str) -> bytes:
    """The bytes of one file named by a path or URI (e.g. a reference .npz); one clear error if absent."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    storage = open_storage(parent or ".")
    if not storage.exists(name):
        raise StorageError(f"{uri} does not exist")
    return storage.read_bytes(name)
