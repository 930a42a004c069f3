"""Peak resident memory of this process, as the benchmarks report it (Linux /proc; stdlib only, so
that Flower's own environment imports it too).

`resource.getrusage(...).ru_maxrss` cannot serve for a process the benchmark starts: Linux keeps
the parent's peak in the child across fork and exec, so a child of a large driver reports the
driver's peak. VmHWM belongs to the process's own address space, and `reset_peak` starts it afresh.
"""

from __future__ import annotations

from pathlib import Path


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (in kB there) in MB."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) / 1024


def reset_peak() -> float:
    """Starts this process's peak (VmHWM) afresh; returns its resident memory now, in MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS:")


def peak_mb() -> float:
    """This process's peak resident memory, in MB, since it started or since `reset_peak`."""
    return _status_mb("VmHWM:")
