"""Headless Chromium for the dashboard's tests and its cost benchmark.

Theory of operation
-------------------
Debian's ``chromium`` runs headless as root in a container only with its sandbox, GPU and
``/dev/shm`` use off; a fresh profile directory per run keeps runs independent. Callers add
what they do with it (``--dump-dom`` of one page, or tabs kept open with a debugging port).
"""

from __future__ import annotations

# The flags every headless run here needs, before the caller's own.
HEADLESS_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-extensions",
)


def chromium_command(executable: str, profile: str, *flags: str) -> list[str]:
    """``executable`` headless with its own ``profile`` directory, then ``flags``."""
    return [executable, *HEADLESS_FLAGS, f"--user-data-dir={profile}", *flags]
