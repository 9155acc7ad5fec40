"""Memory that decoding frees goes back to the system.

glibc's malloc keeps what a thread frees in that thread's arena, for that thread to reuse. Images
decode in many worker threads, so each would keep its own high-water mark of image memory: twelve
36-megapixel images decoded one at a time left 1.2 GB resident, against 0.2 GB with this setting
(tests/hostile/test_bombs.py). Blocks of `MMAP_THRESHOLD` bytes and more (decoded images, Pillow's
image blocks, big batches) get a mapping of their own instead, unmapped when freed; small ones,
where reuse pays, are untouched; and each arena gives back what it has free beyond TRIM_THRESHOLD."""

from __future__ import annotations

import contextlib
import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 4 * 2**20
# Fixing the mmap threshold also fixes the trim threshold at its 128 KB default (glibc stops adapting
# both): raised with it, so the heap is not given back and grown again around every request, but
# well under a thread arena's 64 MB: an arena gives back the free memory at its top only past the
# threshold, and malloc_trim never does for a thread's arena. At 64 MB each image thread kept what
# its biggest request had taken in blocks under 4 MB (a 16 Mpx picture's bytes come in 64 KB
# pieces): four clients looping the largest attention render left +187 MiB resident; at 8 MB, +6.
TRIM_THRESHOLD = 8 * 2**20


def give_back_big_blocks() -> bool:
    """True where the C library took the setting (glibc); elsewhere (musl, macOS) nothing changes."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def resident_bytes() -> int | None:
    """The process's resident memory (Linux's /proc/self/statm), or None where it cannot be read."""
    try:
        pages = int(open("/proc/self/statm").read().split()[1])  # noqa: SIM115 (one read, closed on return)
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def trim() -> None:
    """Gives the main arena's free memory back to the system (glibc's malloc_trim; elsewhere nothing):
    after an unload, what the model's sessions held."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)
