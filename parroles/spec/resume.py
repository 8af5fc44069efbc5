"""What ``parroles resume BATCH`` runs: the spec file the batch recorded, as the file is now."""

from __future__ import annotations

import dataclasses
import hashlib
import os

from parroles.errors import ConfigError
from parroles.ledger import Ledger


@dataclasses.dataclass(frozen=True)
class Resumable:
    """A batch to resume: its id (resolved), its spec file, and whether the file changed since it ran."""

    batch_id: str
    spec_path: str
    changed: bool


def resumable(ledger: Ledger, batch: str) -> Resumable:
    """The batch ``batch`` names (an id or its start) and its spec; ConfigError for a batch of the Python API."""
    record = ledger.get_batch(ledger.resolve_batch_id(batch))
    if record.spec_path is None:
        raise ConfigError(f"batch {record.batch_id} recorded no spec file (the Python API ran it, or an older "
                          f"parroles): run it again with parroles.run(..., reuse={record.batch_id!r})")
    try:
        with open(record.spec_path, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError as exc:
        raise ConfigError(f"batch {record.batch_id} ran {record.spec_path}, which cannot be read now: "
                          f"{exc.strerror}") from exc
    return Resumable(record.batch_id, os.fspath(record.spec_path), digest != record.spec_digest)
