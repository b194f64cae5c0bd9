"""The host side of the guest workloads.

Each guest workload is a small static program in `images/guest-src/` that
streams one line per acknowledged operation while it runs and has a
`--check` mode that prints JSON after the reboot. The modules here build
their command lines from a scenario's workload spec and parse what they
print into the values `harness.crash.verdict` judges:

* `ackrecords` — numbered, checksummed records appended with fsync.
* `fsmeta` — ext4 create/write/rename/unlink with file and directory fsync.
* `fio` — fio verify job options (write phase with saved verify state, and
  the verify phase after the reboot).
"""

from harness.crash.workloads.ackrecords import AckRecordsCheck, AckRecordsObservation
from harness.crash.workloads.fsmeta import FsMetaCheck, FsMetaObservation
from harness.crash.workloads.stream import AckStream

__all__ = [
    "AckRecordsCheck",
    "AckRecordsObservation",
    "AckStream",
    "FsMetaCheck",
    "FsMetaObservation",
]
