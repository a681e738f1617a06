"""The QA cache's errors that the user fixes, and the URL as messages show it.

Both backends (``backends.py`` for SQLite, ``postgres.py``) raise these and name the URL
through ``mask_url`` (``ragdec.urls``), so they live here, below both, rather than in either of them.

Example::

    mask_url("postgresql://app:s3cret@db/cache")   # "postgresql://app:***@db/cache"
"""

from __future__ import annotations

from ragdec.urls import mask_url  # noqa: F401 - the cache's modules import it from here


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


