"""Filesystems for dataset and run URIs: local paths, ``s3://``, ``gs://`` and anything fsspec knows.

Credentials are never taken from configs: S3 uses the standard AWS chain (environment
variables, shared credentials file, instance role); ``endpoint_url`` (not a secret) points at
an S3-compatible store such as MinIO. ``AWS_ENDPOINT_URL`` in the environment works too.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def split_uri(uri: str) -> tuple[str, str]:
    """``("s3", "bucket/key")`` for ``s3://bucket/key``; ``("file", "/abs/path")`` for a local path."""
    if "://" in uri:
        protocol, path = uri.split("://", 1)
        return protocol, path
    return "file", os.path.abspath(os.path.expanduser(uri))


def filesystem_for(uri: str, *, endpoint_url: str | None = None, **options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it (no scheme)."""
    protocol, path = split_uri(uri)
    if protocol == "file":
        return LocalFileSystem(), path
    if protocol in ("s3", "s3a"):
        endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        if endpoint_url:
            options.setdefault("client_kwargs", {})["endpoint_url"] = endpoint_url
        return fsspec.filesystem("s3", **options), path
    return fsspec.filesystem(protocol, **options), path


def join(base: str, *parts: str) -> str:
    """Join URI or path components with '/' (os.path.join would mangle ``s3://``)."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out
