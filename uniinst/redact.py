"""Secrets kept out of what is printed, logged or stored: credentials in URIs.

A URI may carry ``user:password@`` or a signed query string; a library's error message may
quote such a URI whole. Everything that leaves the process as text goes through here.
"""

from __future__ import annotations

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


def redact_text(text: str) -> str:
    """``text`` with the credentials and query strings of every URL in it removed (for error
    messages that quote a URI, ours or a library's)."""
    text = _USERINFO.sub(r"\g<scheme>", text)
    return _QUERY.sub(r"\g<url>", text)
