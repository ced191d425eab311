"""One-line explanations (cause and fix) of the database and system errors a user can cause.

`rlchat.cli.main` prints these instead of a traceback; anything not listed here is a bug and
keeps its traceback.
"""

from __future__ import annotations

from sqlalchemy import exc as sa

READ_ONLY_HINTS = ("readonly database", "read-only", "read only")


def explain(error: BaseException) -> str | None:
    """What went wrong and what to do, or None for an error that is a bug in rlchat."""
    if isinstance(error, sa.SQLAlchemyError):
        return _database(error)
    if isinstance(error, UnicodeError):
        return (
            f"text that is not valid Unicode/UTF-8 ({_first_line(error)}); "
            "give names and messages as UTF-8 text"
        )
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        return (
            f"{where}{error.strerror or error}; check the paths given (--data-dir, "
            "--database-url, files on the command line): a parent that is a file, a missing "
            "folder or a disk without space or write permission causes this"
        )
    return None


def _database(error: sa.SQLAlchemyError) -> str:
    reason = _first_line(getattr(error, "orig", None) or error)
    if any(hint in reason.lower() for hint in READ_ONLY_HINTS):
        return (
            f"the database is read-only ({reason}); use a writable database (--database-url) "
            "or let rlchat write the file and the folder it is in (SQLite adds -wal and "
            "-shm files next to it)"
        )
    if isinstance(error, sa.IntegrityError):
        return (
            f"the database refused a conflicting change ({reason}); another command probably "
            "changed the same rows at the same moment (two `models deploy` at once, say): "
            "look at the current state (`rlchat models list`) and run the command again"
        )
    if isinstance(error, sa.DataError):
        return (
            f"a value does not fit the database ({reason}); check the numbers and texts given "
            "(ids are below 2,147,483,648, user names at most 80 characters)"
        )
    return (
        f"database error: {reason}; check that the database is reachable and migrated "
        "(`rlchat db current`), and run again with -v for the details"
    )


def _first_line(error: object) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
