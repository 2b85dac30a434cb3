"""Secrets kept out of what is printed, logged or stored: credentials in URIs.

A URI may carry ``user:password@`` or a signed query string; a library's error message may
quote such a URI whole. Everything that leaves the process as text goes through here.
"""

from __future__ import annotations

import logging
import re
import urllib.parse

# scheme://userinfo@ where userinfo holds no '/', whitespace or quote: the credentials of a URL.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s'\"@]+@")
# A query string of a URL up to whitespace or a quote: signed URLs carry their keys there.
_QUERY = re.compile(r"(?P<url>[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"?#]*)\?[^\s'\"]*")


def redact_uri(uri: str) -> str:
    """``uri`` as it may be logged or stored: without ``user:pass@``, query string or fragment
    (signed URLs carry their keys in the query). Local paths are returned unchanged."""
    if "://" not in uri:
        return uri
    parts = urllib.parse.urlsplit(uri)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))


def has_credentials(uri: str) -> bool:
    """Whether ``uri`` names a user or password (``scheme://user:pass@host``)."""
    return "://" in uri and "@" in urllib.parse.urlsplit(uri).netloc


def redact_text(text: str) -> str:
    """``text`` with the credentials and query strings of every URL in it removed (for error
    messages that quote a URI, ours or a library's)."""
    text = _USERINFO.sub(r"\g<scheme>", text)
    return _QUERY.sub(r"\g<url>", text)


def credentials_in(texts: list[str]) -> list[str]:
    """The ``user:pass`` parts of the URIs that ``texts`` hold (command-line arguments, say),
    so that messages quoting them in any form can be cleaned."""
    found = []
    for text in texts:
        for match in re.finditer(r"[A-Za-z][A-Za-z0-9+.-]*://([^/\s'\"@]+)@", text):
            userinfo = match.group(1)
            found.append(userinfo)
            password = userinfo.partition(":")[2]
            if len(password) >= 6:  # shorter strings stand in ordinary words too
                found.append(password)
    return found


class Redactor(logging.Filter):
    """Removes credentials from text: those of every URL in it, and the given ``secrets``
    wherever they stand (a library may quote a bucket path without its scheme). As a logging
    filter it cleans every record's message."""

    def __init__(self, secrets: list[str] = ()) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        text = redact_text(text)
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self(record.getMessage())
        record.args = None
        return True
