"""Where prep's tasks run: this process (``workers: 0``), a private local Ray, or an
existing Ray cluster (``--ray-address`` / ``RAY_ADDRESS``).

The local Ray listens on 127.0.0.1 only, keeps its files in a private temporary folder
and caps its object store; it is shut down (by us, never with `ray stop`) when prep
ends. A Ray that is already initialised in this process (a test session, a notebook) is
used as it is and left running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from typing import Any, Callable, Iterable, Iterator, Optional

from data_prep.errors import PrepError

log = logging.getLogger(__name__)

OBJECT_STORE_BYTES = 256 << 20  # results are small: tails, counts, 16 B per document


class InProcess:
    """Runs tasks one after another in this process (tests, tiny inputs, memory://)."""

    workers = 1
    uses_ray = False

    def imap_unordered(self, fn: Callable, items: Iterable, shared: Any) -> Iterator:
        for i, item in enumerate(items):
            yield i, fn(item, shared)


class RayPool:
    """At most ``workers`` Ray tasks in flight, one CPU each; results as they finish."""

    uses_ray = True

    def __init__(self, workers: int):
        self.workers = workers

    def imap_unordered(self, fn: Callable, items: Iterable, shared: Any) -> Iterator:
        import ray

        remote = ray.remote(num_cpus=1, max_retries=1)(_call)
        shared_ref = ray.put(shared)
        pending: dict = {}
        todo = list(enumerate(items))
        todo.reverse()
        try:
            while todo or pending:
                while todo and len(pending) < self.workers:
                    i, item = todo.pop()
                    pending[remote.remote(fn, item, shared_ref)] = i
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    i = pending.pop(ref)
                    yield i, _get(ref)
        finally:
            for ref in pending:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)


def _call(fn: Callable, item: Any, shared: Any) -> Any:
    return fn(item, shared)


def _get(ref) -> Any:
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, PrepError):  # a user error raised in a worker: show it plainly
            raise PrepError(str(cause)) from None
        raise


@contextlib.contextmanager
def executor(workers: Optional[int], ray_address: Optional[str]):
    """``workers`` None: all CPUs of the local machine or cluster; 0: no Ray at all."""
    if workers == 0:
        yield InProcess()
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep to 127.0.0.1
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    address = ray_address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        yield RayPool(workers or _cluster_cpus())
        return
    if address:
        log.info("prep: connecting to the Ray cluster at %s", address)
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise PrepError(f"--ray-address {address}: cannot connect to Ray ({err}); "
                            f"start the cluster (`ray start --head`) or drop the address "
                            f"for a local Ray") from None
        try:
            yield RayPool(workers or _cluster_cpus())
        finally:
            ray.shutdown()
        return
    n = workers or os.cpu_count() or 1
    temp = tempfile.mkdtemp(prefix="distill-ray-")
    log.info("prep: starting a local Ray with %d CPUs (temp %s)", n, temp)
    try:
        ray.init(num_cpus=n, object_store_memory=OBJECT_STORE_BYTES, _temp_dir=temp,
                 include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=True)
        yield RayPool(n)
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def _cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
