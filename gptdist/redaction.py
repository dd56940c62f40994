"""Credentials never reach a log: URIs are shown without their secrets.

A tracking URI such as `https://user:password@mlflow.example.com` or a
presigned `...?X-Amz-Signature=...` would otherwise be stored as an MLflow
param, in the logged config, in error tags, and printed to the console.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
# Query parameters whose values are secrets (matched as substrings, any case).
SECRET_QUERY_WORDS = ("password", "passwd", "pwd", "secret", "token", "signature", "credential", "key", "sig")
URI_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")


def redact_uri(uri: str) -> str:
    """The URI with the password of its user info and the values of secret
    query parameters replaced by ***; anything else unchanged."""
    if "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    netloc, query = parts.netloc, parts.query
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{host}" if has_password else netloc
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_is_secret(k) for k, _ in pairs):
            query = urlencode([(k, MASK if _is_secret(k) else v) for k, v in pairs], safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        # Nothing secret: the text as given (a rebuilt sqlite:////abs/path
        # would lose a slash).
        return uri
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Every URI inside a free text (an error message, a YAML file) redacted."""
    return URI_PATTERN.sub(lambda m: redact_uri(m.group(0)), text)


def _is_secret(key: str) -> bool:
    return any(word in key.lower() for word in SECRET_QUERY_WORDS)
