"""Credentials out of URIs before they are written anywhere: logs, manifests, records, reports, model cards.

A dataset source or a weights location may carry a secret: `https://user:pass@host/…`,
`s3://KEY:SECRET@bucket/…`, or a presigned URL's signature and credential in its query
string. The URI is still needed to fetch; what is written about it must not let a reader
fetch it too. `redact_uri` is the one place that decides what is secret; `redact_text`
applies it to every URI inside a message. Both are idempotent.
"""
from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

REDACTED = "***"
# query/fragment parameters that are secrets whatever their value (compared lower-case) ...
SECRET_PARAMETERS = frozenset({"sig", "key", "apikey", "api_key", "awsaccesskeyid", "code", "auth", "pass"})
# ... and any parameter whose name contains one of these
SECRET_WORDS = ("signature", "credential", "token", "secret", "password")
URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_uri(uri: str) -> str:
    """The URI with its user info and secret query/fragment parameters replaced by ***; other text unchanged."""
    try:
        parts = urlsplit(uri)
    except ValueError:  # e.g. an unbalanced "[" in the host: nothing in it can be trusted to be public
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query, fragment = _redact_parameters(parts.query), _redact_parameters(parts.fragment)
    if (netloc, query, fragment) == (parts.netloc, parts.query, parts.fragment):
        return uri
    return urlunsplit(parts._replace(netloc=netloc, query=query, fragment=fragment))


def redact_text(text: str) -> str:
    """A message with every URI in it redacted (for text that may quote a source or a weights location)."""
    return URI_IN_TEXT.sub(lambda match: redact_uri(match.group(0)), str(text))


def _redact_parameters(query: str) -> str:
    if "=" not in query:
        return query
    return "&".join(_redact_parameter(parameter) for parameter in query.split("&"))


def _redact_parameter(parameter: str) -> str:
    name, equals, value = parameter.partition("=")
    lowered = name.lower()
    secret = lowered in SECRET_PARAMETERS or any(word in lowered for word in SECRET_WORDS)
    return f"{name}={REDACTED}" if equals and value and secret else parameter
