"""Database URLs as they may be shown or kept: a password never leaves the process that was given it.

The QA cache (``ragdec.cache``) and the pgvector store (``ragdec.retrieval``) both take
PostgreSQL URLs, and both name them in errors and manifests; this module sits above both
packages so that neither imports the other for it.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


def mask_url(url: str) -> str:
    """``url`` with its password, in the user part or the query, shown as ``***``: what
    an error message may say.

    Example: ``mask_url("postgresql://app:s3cret@db:5432/cache?password=x&sslmode=require")``
    -> ``"postgresql://app:***@db:5432/cache?password=***&sslmode=require"``.
    """
    parts = urlsplit(url)
    user, host = _user_and_host(parts.netloc)
    netloc = f"{user.split(':', 1)[0]}:***@{host}" if user is not None and ":" in user else parts.netloc
    query = re.sub(r"(^|&)password=[^&]*", r"\1password=***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def without_password(url: str) -> str:
    """``url`` with no password, in the user part or the query: what a manifest may keep.

    Example: ``without_password("postgresql://app:s3cret@db/rag?password=x&sslmode=require")``
    -> ``"postgresql://app@db/rag?sslmode=require"``.
    """
    parts = urlsplit(url)
    user, host = _user_and_host(parts.netloc)
    netloc = f"{user.split(':', 1)[0]}@{host}" if user is not None else parts.netloc
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "password"], safe="/")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _user_and_host(netloc: str) -> tuple[str | None, str]:
    """("user[:password]", "host[:port]") of a URL's netloc; (None, netloc) without a user."""
    if "@" not in netloc:
        return None, netloc
    user, host = netloc.rsplit("@", 1)
    return user, host
