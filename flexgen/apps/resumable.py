"""The durable results file shared by the apps that resume after a crash (batch, data_wrangle).

One JSON object a line, each with an "id". Lines are appended in whole writes, flushed and
fsync'ed; the file is locked while a run appends, so two runs cannot interleave. On reopening,
the ids already written are read back (a rerun skips them) and a partial last line left by a
kill is cut off.

    with locked_output(path) as f:
        done = load_done(path, log=print)
        append_records(f, [{"id": 1, ...}], path)
"""
from __future__ import annotations

import contextlib
import json
import os
import sys


class ResultsFileError(ValueError):
    """An output file that is not a results file the runner can safely append to (message meant for the user)."""


def id_key(value) -> str:
    """Ids compare as their JSON text: 7 and "7" are different ids."""
    return json.dumps(value, ensure_ascii=False)


def _stderr(msg):
    print(msg, file=sys.stderr, flush=True)


def _result_id(line: bytes):
    """The id key of a complete result line, or None if it is not one."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except ValueError:  # includes UnicodeDecodeError
        return None
    if not isinstance(obj, dict) or "id" not in obj:
        return None
    return id_key(obj["id"])


def load_done(path, repair: bool = True, log=None) -> set:
    """Id keys already in the results file. A crash can leave a partial last line (no newline, or
    not valid JSON): with repair, the file is truncated to its last complete result line. A bad
    line before good ones is not a crash artefact: ResultsFileError, and the file is left alone."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return set()
    except OSError as e:
        raise ResultsFileError(f"cannot read {path}: {e.strerror or e}") from None
    lines = data.split(b"\n")
    lines.pop()                             # after the last newline: b"" when the file ends cleanly
    ids, good_len, bad, pos = [], 0, [], 0
    for n, line in enumerate(lines, start=1):
        pos += len(line) + 1
        if not line.strip():
            if not bad:
                good_len = pos
            continue
        key = _result_id(line)
        if key is None:
            bad.append(n)
            continue
        if bad:
            raise ResultsFileError(f"{path} line {bad[0]} is not a result line, and results follow it; "
                                   "fix or move the file (nothing was changed)")
        ids.append(key)
        good_len = pos
    if good_len < len(data):
        what = f"{len(data) - good_len} bytes of a partial last line"
        if not repair:
            raise ResultsFileError(f"{path} ends with {what}")
        with open(path, "r+b") as f:
            f.truncate(good_len)
            f.flush()
            os.fsync(f.fileno())
        (log or _stderr)(f"repaired {path}: removed {what} (left by an interrupted run)")
    return set(ids)


@contextlib.contextmanager
def locked_output(path):
    """The results file opened for appending (created if missing, its directory entry synced),
    with an exclusive lock so that two runs cannot interleave lines."""
    created = not os.path.exists(path)
    try:
        f = open(path, "ab")
    except OSError as e:
        raise ResultsFileError(f"cannot open {path} for appending: {e.strerror or e}") from None
    try:
        if created:
            _fsync_dir(os.path.dirname(os.path.abspath(path)))
        try:
            import fcntl
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            pass
        except OSError:
            raise ResultsFileError(f"{path} is being written by another run") from None
        yield f
    finally:
        f.close()


def append_records(f, records, path) -> None:
    """Append records (dicts with an "id") to the open results file in one durable write."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    try:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    except OSError as e:  # a full disk, a vanished file system: earlier writes are safe
        raise ResultsFileError(f"cannot write {path}: {e.strerror or e}") from e


def _fsync_dir(d):
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
