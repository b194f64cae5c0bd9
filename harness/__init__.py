"""powercut: crash-consistency test harness for virtual disks."""

__version__ = "0.1.0"
