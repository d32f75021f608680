"""One writer per output (a dataset, a sample set): a lock file created atomically, removed by its holder."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid

from .errors import UserError
from .storage import Storage, StorageError


class OutputLock:
    """One writer per output: the lock file `name` is created only where absent (atomically: O_EXCL locally,
    S3's If-None-Match), and removed by its holder. A second writer gets `error(message)`, one line naming the
    holder. Also a context manager."""

    def __init__(self, storage: Storage, name: str, writer: str, error: type[UserError]):
        self.storage, self.name, self.writer, self.error = storage, name, writer, error
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
                       "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def acquire(self) -> None:
        if self._create():
            return
        holder = self._holder()
        # A killed run's lock is taken over on its host, so that running the job again resumes it.
        if holder is not None and _has_ended(holder) and self._take_over(holder) and self._create():
            return
        holder = self._holder()
        who = f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}" if holder else "unknown"
        raise self.error(f"output {self.storage.uri} is being written by another {self.writer} ({who}); if no "
                         f"such job is running, delete {self.storage.url(self.name)} and run again")

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def release(self) -> None:
        # Only our own: a lock that a user deleted and another job then took is not ours to remove.
        if self._holder() == self.record:
            self.storage.delete(self.name)

    def _create(self) -> bool:
        return self.storage.create_exclusive(self.name, json.dumps(self.record, sort_keys=True).encode())

    def _holder(self) -> dict | None:
        """The lock's record; None when there is none or it is being written at this moment."""
        try:
            record = json.loads(self.storage.read_bytes(self.name))
        except (OSError, StorageError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _take_over(self, stale: dict) -> bool:
        # Of two runs that both found the stale lock, only the one that creates the marker removes it:
        # the other could otherwise remove the lock that the first has just taken.
        digest = hashlib.sha256(json.dumps(stale, sort_keys=True).encode()).hexdigest()[:16]
        marker = f"{self.name}.{digest}.takeover"  # a name of ours, whatever the lock's content
        if not self.storage.create_exclusive(marker, b""):
            return False
        try:
            if self._holder() == stale:
                self.storage.delete(self.name)
        finally:
            self.storage.delete(marker)
        return True


def _has_ended(holder: dict) -> bool:
    """True only for a holder that ran on this host and runs no more (another host's cannot be checked)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: a process of another user
        return False
    return False
