"""The QA cache's errors that the user fixes, and the URL as messages show it.

Both backends (``backends.py`` for SQLite, ``postgres.py``) raise these and name the URL
through ``mask_url``, so they live here, below both, rather than in either of them.

Example::

    mask_url("postgresql://app:s3cret@db/cache")   # "postgresql://app:***@db/cache"
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit


class CacheFileError(ValueError):
    """The file or database cannot be used as a QA cache: damaged, foreign, or made by
    another embedder."""


class CacheUnreachableError(ValueError):
    """The cache's database cannot be reached (no driver, refused, wrong password, no such
    database, connection lost); the message names the URL, password masked, and what to
    check. A ValueError, as the commands' other errors that the user fixes."""


def missing_cache(location: str) -> FileNotFoundError:
    """The error for a cache that is not there yet, with how to make one."""
    return FileNotFoundError(f"no QA cache at {location}: create it with `ragdec faq import FILE --db {location}` or by caching answers")


def mask_url(url: str) -> str:
    """``url`` with its password, in the user part or the query, shown as ``***``.

    Example: ``mask_url("postgresql://app:s3cret@db:5432/cache?password=x&sslmode=require")``
    -> ``"postgresql://app:***@db:5432/cache?password=***&sslmode=require"``.
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, host = netloc.rsplit("@", 1)
        if ":" in user:
            user = user.split(":", 1)[0] + ":***"
        netloc = f"{user}@{host}"
    query = re.sub(r"(^|&)password=[^&]*", r"\1password=***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
