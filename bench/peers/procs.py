"""A server's process tree from /proc (Linux): the CPU time it has used and its resident memory.
PyTriton's tritonserver and stub, and LitServe's workers, are children of the process started."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command (which may hold spaces): state is [0], ppid [1]."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def tree(root: int) -> list[int]:
    """`root` and every process descended from it."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                children[int(_stat(int(entry.name))[1])].append(int(entry.name))
            except (OSError, IndexError):  # gone meanwhile
                continue
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children[pid])
    return found


def cpu_seconds(root: int) -> float:
    """User and system CPU seconds of the tree: each live process's own and its reaped children's
    (utime, stime, cutime, cstime), so a child that exits keeps counting."""
    total = 0
    for pid in tree(root):
        try:
            total += sum(int(v) for v in _stat(pid)[11:15])
        except (OSError, IndexError):
            continue
    return total / TICKS


def resident_bytes(root: int) -> int:
    """The tree's resident memory: the sum of its processes' RSS (pages they share count in each)."""
    page, total = os.sysconf("SC_PAGE_SIZE"), 0
    for pid in tree(root):
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except (OSError, IndexError):
            continue
    return total
