"""A periodic progress line with rate and ETA; works the same in logs, CI and terminals.
Also for a child process that reports its progress as "Progress N of M" lines (pip's
``--progress-bar raw``): ``run_with_progress``."""

from __future__ import annotations

import logging
import re
import subprocess
import threading
import time
from pathlib import Path


def format_seconds(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _count(value: float) -> str:
    """Whole counts as they are, amounts (MiB) with one decimal."""
    return f"{value:.1f}" if isinstance(value, float) else str(value)


class Progress:
    """``p = Progress("prep", total=n, unit="docs"); p.update(k, tokens=t)``.

    Logs at most every ``every_s`` seconds: done/total, rate per unit and per extra
    counter, and the ETA. ``close()`` logs the final line.
    """

    def __init__(self, desc: str, total: int | None = None, unit: str = "it",
                 every_s: float = 10.0, logger: logging.Logger | None = None):
        self.desc, self.total, self.unit, self.every_s = desc, total, unit, every_s
        self.log = logger or logging.getLogger("distill.progress")
        self.done = 0
        self.extra: dict[str, float] = {}
        self.start = time.perf_counter()
        self._last = self.start

    def update(self, n: int = 1, **counters: float) -> None:
        self.done += n
        for k, v in counters.items():
            self.extra[k] = self.extra.get(k, 0) + v
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            self.log.info(self.line())

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.done / elapsed
        parts = [f"{self.desc}: {_count(self.done)}"
                 + (f"/{_count(self.total)}" if self.total else "") + f" {self.unit}",
                 f"{rate:.1f} {self.unit}/s"]
        parts += [f"{v / elapsed:,.0f} {k}/s" for k, v in self.extra.items()]
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            parts.append(f"ETA {format_seconds(eta)}")
        parts.append(f"elapsed {format_seconds(elapsed)}")
        return ", ".join(parts)

    def close(self) -> None:
        self.log.info(self.line())


def run_with_progress(cmd: list[str], cwd: Path, desc: str, *, unit: str, scale: float,
                      logger: logging.Logger, timeout: float = 1800
                      ) -> subprocess.CompletedProcess:
    """Run ``cmd``; its "Progress N of M" lines become a progress line (N / ``scale``
    ``unit``, with rate and ETA); the other lines (stdout and stderr) are returned as
    stdout. Killed after ``timeout`` seconds (subprocess.TimeoutExpired)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    progress, seen, kept = None, 0.0, []
    try:
        for line in proc.stdout:
            match = re.match(r"Progress (\d+) of (\d+)", line)
            if not match:
                kept.append(line)
                continue
            done, total = (int(v) / scale for v in match.groups())
            progress = progress or Progress(desc, total=round(total, 1), unit=unit,
                                            logger=logger)
            progress.update(done - seen)
            seen = done
        proc.wait()
    finally:
        timer.cancel()
    if progress is not None:
        progress.close()
    if proc.returncode < 0:
        raise subprocess.TimeoutExpired(cmd, timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(kept), "")
