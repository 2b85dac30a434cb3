"""Filesystems for dataset and run URIs: local paths, ``s3://``, ``gs://`` and anything fsspec knows.

Credentials are never taken from configs: S3 uses the standard AWS chain (environment
variables, shared credentials file, instance role); ``endpoint_url`` (not a secret) points at
an S3-compatible store such as MinIO. ``AWS_ENDPOINT_URL`` in the environment works too.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from uniinst.atomic_file import atomic_output
from uniinst.redact import has_credentials, redact_uri

_CLOUD_STORES = ("s3", "s3a", "gs", "gcs")


def absolute(uri: str) -> str:
    """A URI as it is; a local path made absolute (``~`` expanded)."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def split_uri(uri: str) -> tuple[str, str]:
    """``("s3", "bucket/key")`` for ``s3://bucket/key``; ``("file", "/abs/path")`` for a local path."""
    if "://" in uri:
        protocol, path = uri.split("://", 1)
        return protocol, path
    return "file", absolute(uri)


def filesystem_for(uri: str, *, endpoint_url: str | None = None, **options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it (no scheme)."""
    protocol, path = split_uri(uri)
    if protocol == "file":
        return LocalFileSystem(), path
    if protocol in _CLOUD_STORES and has_credentials(uri):
        # s3fs and gcsfs would take "user:pass@bucket" for a bucket name and quote it in errors.
        raise ValueError(
            f"{redact_uri(uri)}: a {protocol}:// URI must not carry credentials (user:password@); "
            "they come from the environment, a profile or the instance's role"
        )
    if protocol in ("s3", "s3a"):
        endpoint_url = s3_endpoint(endpoint_url)
        if endpoint_url:
            options.setdefault("client_kwargs", {})["endpoint_url"] = endpoint_url
        return fsspec.filesystem("s3", **options), path
    return fsspec.filesystem(protocol, **options), path


def s3_endpoint(endpoint_url: str | None) -> str | None:
    """The S3 endpoint to use: ``endpoint_url``, else ``AWS_ENDPOINT_URL``, else AWS's own.
    One carrying credentials is refused: they come from the AWS chain, and a client would
    quote them in its errors."""
    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    if endpoint_url and has_credentials(endpoint_url):
        raise ValueError(
            f"the S3 endpoint URL {redact_uri(endpoint_url)} must not carry credentials (user:password@): "
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile or instance role) instead"
        )
    return endpoint_url


def join(base: str, *parts: str) -> str:
    """Join URI or path components with '/' (os.path.join would mangle ``s3://``)."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def exists(uri: str, *, endpoint_url: str | None = None) -> bool:
    fs, path = filesystem_for(uri, endpoint_url=endpoint_url)
    return bool(fs.exists(path))


def upload_file(local: str | os.PathLike, uri: str, *, endpoint_url: str | None = None) -> None:
    """Copy a local file to ``uri`` so that a reader never sees it half-written: an object
    store publishes an object whole; a local destination is written next to it and renamed."""
    fs, path = filesystem_for(uri, endpoint_url=endpoint_url)
    if isinstance(fs, LocalFileSystem):
        with open(local, "rb") as src, atomic_output(path) as dst:
            shutil.copyfileobj(src, dst)
        return
    fs.put_file(os.fspath(local), path)


def download_file(uri: str, local: str | os.PathLike, *, endpoint_url: str | None = None) -> bool:
    """Copy ``uri`` to a local file; False when it does not exist."""
    fs, path = filesystem_for(uri, endpoint_url=endpoint_url)
    if not fs.exists(path):
        return False
    fs.get_file(path, os.fspath(local))
    return True


def arrow_filesystem_for(uri: str, *, endpoint_url: str | None = None) -> tuple[Any, str]:
    """A ``pyarrow.fs`` filesystem and path for ``uri`` when an S3 endpoint must be named (for
    libraries that take one, such as Ray Train's ``storage_filesystem``), else ``(None, uri)``.

    It is the same s3fs client as everywhere else here, behind pyarrow's fsspec handler;
    credentials are left to the AWS chain of each process that unpickles it."""
    protocol, path = split_uri(uri)
    endpoint_url = s3_endpoint(endpoint_url)
    if protocol not in ("s3", "s3a") or not endpoint_url:
        return None, (path if protocol == "file" else uri)
    import pyarrow.fs

    fs, path = filesystem_for(uri, endpoint_url=endpoint_url)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path
