"""Child processes of the harness: waiting for them to be ready, stopping them for good."""

from __future__ import annotations

import select
import subprocess
import time


def wait_for_line(process: subprocess.Popen[bytes], prefix: bytes, timeout: float) -> bytes:
    """Read ``process``'s stdout until a line starts with ``prefix``.

    Stops early if the process exits, and at ``timeout``. Returns the last
    line read: it starts with ``prefix`` only if the wait succeeded.
    """
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.1)
        if ready:
            line = process.stdout.readline()
            if line.startswith(prefix) or (not line and process.poll() is not None):
                return line
    return line


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Terminate ``process``; kill it if it has not ended within ``timeout``."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)
