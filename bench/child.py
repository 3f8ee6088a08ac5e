"""The benchmark's helper processes, spoken to in lines over their stdin and stdout.

The echo's responder, etcd's load driver and the fleet of real agents each
run as ``python -m bench.<module>`` in a process of their own, so that each
has a core's share and a CPU column of its own. The parent writes commands
as lines on the child's stdin; the child answers with lines that start with
a prefix the parent waits for (``ready: ``, ``reply: ``...), and exits when
its stdin closes, so it also goes away if the benchmark dies. Every wait is
bounded.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvstore.testing.process import stop_process, wait_for_line

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ChildProcess:
    """One helper process: ``start()``, ``send()`` and ``read()`` lines, ``close()``."""

    def __init__(self, module: str, log_path: Path, error: type[Exception]) -> None:
        self.module = module
        self.log_path = log_path
        self.error = error
        """The exception raised when the child is gone or silent."""
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                cwd=PROJECT_ROOT, env=env, start_new_session=True,
            )

    def send(self, message: dict[str, Any] | str) -> None:
        """One line on the child's stdin: a JSON object, or a bare word."""
        process = self.process
        if process is None or process.stdin is None:
            raise self.error(f"{self.module} is not running")
        line = message if isinstance(message, str) else json.dumps(message)
        try:
            process.stdin.write(line.encode() + b"\n")
            process.stdin.flush()
        except OSError as error:
            raise self.error(f"{self.module} is gone ({error}); see {self.log_path}") from error

    def read(self, prefix: str, timeout: float) -> str:
        """The rest of the child's next line that starts with ``prefix``."""
        process = self.process
        if process is None:
            raise self.error(f"{self.module} is not running")
        wanted = prefix.encode()
        line = wait_for_line(process, wanted, timeout)
        if not line.startswith(wanted):
            raise self.error(f"{self.module} did not say {prefix.strip()!r} within "
                             f"{timeout:g}s (last output {line[:200]!r}); see {self.log_path}")
        return line[len(wanted):].decode().strip()

    def read_json(self, prefix: str, timeout: float) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(self.read(prefix, timeout))
        return found

    def close(self, timeout: float = 3.0) -> None:
        """Close the child's stdin (it exits) and wait ``timeout``; then terminate it."""
        process, self.process = self.process, None
        if process is None:
            return
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_process(process, timeout)


def child_main(name: str, serve: Callable[[dict[str, Any]], object]) -> int:
    """In the child: read the settings (the first JSON line on stdin) and ``serve`` them.

    Returns the process's exit status: 0 when served (or when the parent went
    away before saying anything), 1 with one line on stderr if serving failed.
    """
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    line = sys.stdin.buffer.readline()
    if not line:
        return 0
    try:
        serve(json.loads(line))
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        print(f"{name}: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


def write_line(prefix: str, body: dict[str, Any]) -> None:
    """In the child: one line for the parent, ``prefix`` then ``body`` as JSON."""
    sys.stdout.buffer.write(prefix.encode() + json.dumps(body).encode() + b"\n")
    sys.stdout.buffer.flush()
