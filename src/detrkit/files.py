"""Files: written atomically, and the one JSON reader whose errors name the file and the fix."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Union

from detrkit.errors import DetrkitError

PathLike = Union[str, "os.PathLike[str]"]


def atomic_write(dest: Path, write: Callable[[str], None]) -> None:
    """Write one file through ``write(tmp_path)`` to a temporary name, fsync it, rename it to ``dest``."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(dest: Path, text: str) -> None:
    """:func:`atomic_write` of a text file."""
    atomic_write(dest, lambda tmp: Path(tmp).write_text(text))


def read_json(path: PathLike, error: type[DetrkitError], what: str) -> Any:
    """The parsed JSON file ``path``; any failure raises ``error`` naming ``path`` as ``what``
    ("annotation file", "checkpoint config", ...) and saying what is wrong with it."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f"{path}: {what} not found; fix: check the path") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, expected a {what} (.json)") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # not UTF-8, a huge number, absurd nesting
        raise error(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise error(f"{path}: cannot read the {what} ({e.strerror or e})") from None
