"""S3-compatible blob store (AWS S3, MinIO, Ceph RGW, ...), configured from the environment.

    SPK_S3_BUCKET, SPK_S3_REGION, SPK_S3_ACCESS_KEY_ID, SPK_S3_SECRET_ACCESS_KEY   required
    SPK_S3_ENDPOINT     http(s) URL of an S3-compatible service; unset means AWS itself
    SPK_S3_PATH_STYLE   true/false (default false): bucket in the path instead of the host name

A partial configuration registers nothing and names the missing variable. Credentials live only
in this process's memory: never in the database, a log line, an error message or a repr.
Objects are `blobs/ab/<sha256>.whl`; a PUT is atomic, so no half-written blob is ever visible.
"""

from __future__ import annotations

import hashlib
import io
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from shared.errors import IntegrityError, InvalidArgument, NotFound, StoreError
from shared.hashing import READ_CHUNK
from shared.names import check_sha256

PREFIX = "SPK_S3_"
REQUIRED = ("BUCKET", "REGION", "ACCESS_KEY_ID", "SECRET_ACCESS_KEY")
OPTIONAL = ("ENDPOINT", "PATH_STYLE")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
_NOT_FOUND = ("404", "NoSuchKey", "NotFound")


@dataclass(frozen=True)
class S3Config:
    bucket: str
    region: str
    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    endpoint: str | None = None  # None: AWS
    path_style: bool = False


def s3_config_from_env(env: Mapping[str, str]) -> tuple[S3Config | None, str | None]:
    """(config, None) when complete; (None, problem) when partial; (None, None) when unset."""
    values = {name: env.get(PREFIX + name, "").strip() for name in REQUIRED + OPTIONAL}
    if not any(values.values()):
        return None, None
    missing = [PREFIX + name for name in REQUIRED if not values[name]]
    if missing:
        return None, f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set"
    path_style = values["PATH_STYLE"].lower()
    if path_style not in _TRUE + _FALSE:
        return None, f"{PREFIX}PATH_STYLE must be true or false, got {values['PATH_STYLE']!r}"
    endpoint = values["ENDPOINT"] or None
    if endpoint is not None:
        parsed = urllib.parse.urlsplit(endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            return (
                None,
                f"{PREFIX}ENDPOINT must be an http(s) URL, e.g. https://minio.internal:9000",
            )
        if parsed.username or parsed.password:
            return None, f"{PREFIX}ENDPOINT must not contain credentials; use the key variables"
    config = S3Config(
        bucket=values["BUCKET"],
        region=values["REGION"],
        access_key_id=values["ACCESS_KEY_ID"],
        secret_access_key=values["SECRET_ACCESS_KEY"],
        endpoint=endpoint,
        path_style=path_style in _TRUE,
    )
    return config, None


def make_client(config: S3Config) -> Any:
    """A boto3 S3 client (thread-safe; one per store)."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=config.endpoint,
        region_name=config.region,
        aws_access_key_id=config.access_key_id,
        aws_secret_access_key=config.secret_access_key,
        config=Config(
            s3={"addressing_style": "path" if config.path_style else "auto"},
            connect_timeout=5,
            read_timeout=60,
            retries={"max_attempts": 3, "mode": "standard"},
            # botocore >= 1.36 sends streaming CRC trailers by default, which several
            # S3-compatible servers reject. Integrity does not depend on them: we hash before
            # upload, migration reads every copy back, and satellites verify every download.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


class S3BlobStore:
    name = "s3"

    def __init__(self, config: S3Config, client: Any = None) -> None:
        self.bucket = config.bucket
        self._client = client if client is not None else make_client(config)

    @staticmethod
    def key_for(sha256: str) -> str:
        digest = check_sha256(sha256)
        return f"blobs/{digest[:2]}/{digest}.whl"

    def _fail(self, what: str, exc: Exception) -> StoreError:
        code = _error_code(exc) or type(exc).__name__
        return StoreError(f"s3 bucket {self.bucket}: {what} failed ({code})")

    def _head(self, sha256: str) -> int | None:
        try:
            reply = self._client.head_object(Bucket=self.bucket, Key=self.key_for(sha256))
        except Exception as exc:
            if _error_code(exc) in _NOT_FOUND:
                return None
            raise self._fail(f"HEAD {sha256[:12]}", exc) from None
        return int(reply["ContentLength"])

    def locate(self, sha256: str) -> str | None:
        return self.name if self.has(sha256) else None

    def has(self, sha256: str) -> bool:
        return self._head(sha256) is not None

    def size(self, sha256: str) -> int | None:
        return self._head(sha256)

    def local_path(self, sha256: str) -> Path | None:
        return None  # remote objects

    def presigned_get(self, sha256: str, ttl_seconds: int) -> str:
        """A URL anyone holding it may GET the blob with until it expires: a secret meanwhile.

        Signed locally (no request to the store); the object must exist, which the caller knows
        from the blob index.
        """
        try:
            url = self._client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": self.key_for(sha256)},
                ExpiresIn=ttl_seconds,
            )
        except Exception as exc:
            raise self._fail(f"presigning {sha256[:12]}", exc) from None
        return str(url)

    def put_file(self, sha256: str, src: Path) -> bool:
        digest = check_sha256(sha256)
        if self._head(digest) is not None:
            return False
        h = hashlib.sha256()
        size = 0
        with src.open("rb") as f:
            while chunk := f.read(READ_CHUNK):
                h.update(chunk)
                size += len(chunk)
        if h.hexdigest() != digest:
            # The one choke point every blob passes: content must match its address.
            raise IntegrityError(f"{src.name}: sha256 is {h.hexdigest()}, expected {digest}")
        try:
            # upload_file switches to a multipart upload for big files; either way the object
            # only becomes visible once complete.
            self._client.upload_file(str(src), self.bucket, self.key_for(digest))
        except Exception as exc:
            raise self._fail(f"PUT {digest[:12]}", exc) from None
        stored = self._head(digest)
        if stored != size:
            raise IntegrityError(f"s3 copy of {digest[:12]} has {stored} bytes, expected {size}")
        return True

    def open_read(self, sha256: str, offset: int = 0) -> BinaryIO:
        digest = check_sha256(sha256)
        if offset < 0:
            raise InvalidArgument("offset", "must be >= 0")
        try:
            # One request in the common case; a HEAD only to explain an unsatisfiable range.
            reply = self._client.get_object(
                Bucket=self.bucket, Key=self.key_for(digest), Range=f"bytes={offset}-"
            )
        except Exception as exc:
            code = _error_code(exc)
            if code in _NOT_FOUND:
                raise NotFound(f"blob {digest} is not in the {self.name} store") from None
            if code != "InvalidRange":
                raise self._fail(f"GET {digest[:12]}", exc) from None
            total = self._head(digest)
            if total is None:
                raise NotFound(f"blob {digest} is not in the {self.name} store") from None
            if offset > total:
                raise InvalidArgument(
                    "offset", f"{offset} is beyond the blob's {total} bytes"
                ) from None
            return io.BytesIO(b"")  # offset == size: a resumed download that had finished
        return io.BufferedReader(_BodyReader(reply["Body"]), buffer_size=READ_CHUNK)

    def delete(self, sha256: str) -> bool:
        digest = check_sha256(sha256)
        if self._head(digest) is None:
            return False
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self.key_for(digest))
        except Exception as exc:
            raise self._fail(f"DELETE {digest[:12]}", exc) from None
        return True

    def list(self) -> Iterator[str]:
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix="blobs/"
            )
            keys = [obj["Key"] for page in pages for obj in page.get("Contents", ())]
        except Exception as exc:
            raise self._fail("LIST", exc) from None
        for key in sorted(keys):
            name = key.rsplit("/", 1)[-1]
            if name.endswith(".whl"):
                try:
                    yield check_sha256(name[:-4])
                except InvalidArgument:
                    continue  # not ours


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


class _BodyReader(io.RawIOBase):
    """A botocore StreamingBody as a raw binary stream."""

    def __init__(self, body: Any) -> None:
        super().__init__()
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        data = self._body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()
