"""`distill launch status|logs|cancel JOB` for Slurm and Ray jobs.

JOB is looked up in the records `distill launch` wrote at submission (launcher/jobs.py);
without a record, a number is a Slurm job id and anything else a Ray submission id on
``--ray-address`` (or ``RAY_ADDRESS``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from launcher import jobs, ray_jobs, slurm
from launcher.errors import LaunchError

SUCCESS = {"COMPLETED", "SUCCEEDED"}


def resolve(job: str, ray_address: str | None = None) -> jobs.JobRecord:
    record = jobs.find(job)
    if record is not None:
        if ray_address and record.scheduler == "ray":
            record.address = ray_address
        return record
    if job.isdigit():
        return jobs.JobRecord(scheduler="slurm", job_id=job, recipe="", stage="",
                              profile="")
    address = ray_address or os.environ.get("RAY_ADDRESS", "")
    if not address.startswith(("http://", "https://")):
        raise LaunchError(f"no record of job {job!r} (submitted from another machine?); "
                          f"a Slurm job id is a number, for a Ray job pass --ray-address "
                          f"http://HEAD:8265")
    return jobs.JobRecord(scheduler="ray", job_id=job, recipe="", stage="", profile="",
                          address=address)


def state(record: jobs.JobRecord) -> str:
    if record.scheduler == "slurm":
        return slurm.job_state(record.job_id)
    return ray_jobs.status(record.address, record.job_id)


def is_terminal(record: jobs.JobRecord, st: str) -> bool:
    if record.scheduler == "slurm":
        # Slurm may print e.g. "CANCELLED by 0": the first word is the state.
        return st.split()[0] in slurm.TERMINAL_STATES
    return st in ray_jobs.TERMINAL


def wait(record: jobs.JobRecord, timeout_s: float, poll_s: float = 1.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        st = state(record)
        if is_terminal(record, st):
            return st
        if time.monotonic() > deadline:
            raise LaunchError(f"job {record.job_id} still {st} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def logs(record: jobs.JobRecord) -> str:
    if record.scheduler == "slurm":
        path = slurm.log_file(record.job_id, record.log_file)
        if not path.is_file():
            raise LaunchError(f"Slurm job {record.job_id}: log file {path} does not exist "
                              f"(yet); `distill launch status {record.job_id}`")
        return Path(path).read_text(errors="replace")
    return ray_jobs.logs(record.address, record.job_id)


def cancel(record: jobs.JobRecord) -> str:
    if record.scheduler == "slurm":
        slurm.cancel(record.job_id)
        return f"cancelled Slurm job {record.job_id}"
    stopped = ray_jobs.cancel(record.address, record.job_id)
    return (f"stopping Ray job {record.job_id}" if stopped
            else f"Ray job {record.job_id} had already finished")
