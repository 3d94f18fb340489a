"""Records of submitted jobs, so `distill launch status|logs|cancel JOB` knows whether JOB
is a Slurm or a Ray job, where its log is and which Ray cluster holds it.

One JSON file per job under ``<cache>/jobs/`` (``$DISTILL_CACHE`` or
``~/.cache/distill-encoders``), written when the job is submitted.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from distill_common.assets import cache_dir
from distill_common.fsio import atomic_write_json


@dataclass
class JobRecord:
    scheduler: str
    """slurm | ray."""
    job_id: str
    """Slurm job id or Ray submission id."""
    recipe: str
    stage: str
    profile: str
    submitted_at: str = ""
    log_file: Optional[str] = None
    """Slurm: the job's log file (stdout and stderr)."""
    address: Optional[str] = None
    """Ray: the dashboard address the job was submitted to."""
    script: Optional[str] = None
    """Slurm: the rendered sbatch script that was submitted."""


def jobs_dir() -> Path:
    return cache_dir() / "jobs"


def _file(scheduler: str, job_id: str) -> Path:
    return jobs_dir() / f"{scheduler}-{re.sub(r'[^A-Za-z0-9_.-]', '_', job_id)}.json"


def save(record: JobRecord) -> Path:
    record.submitted_at = record.submitted_at or time.strftime("%Y-%m-%dT%H:%M:%S")
    path = _file(record.scheduler, record.job_id)
    atomic_write_json(path, asdict(record))
    return path


def find(job_id: str) -> JobRecord | None:
    """The newest record of JOB (a Slurm id may have been reused by another cluster)."""
    found = [p for p in (_file("slurm", job_id), _file("ray", job_id)) if p.is_file()]
    if not found:
        return None
    newest = max(found, key=lambda p: p.stat().st_mtime)
    return JobRecord(**json.loads(newest.read_text()))
