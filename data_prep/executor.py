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
    """At most ``workers`` Ray tasks running at once, one CPU each; results as they finish.

    Each worker has a second task queued behind the one it runs, so Ray starts it the
    moment a CPU frees, without a round trip through this (Python) driver: that gap was
    ~13 ms per task, 4% of a prep run on a small corpus. When ``workers`` is less than
    the cluster's CPUs, a placement group of ``workers`` CPUs holds the queued tasks back;
    otherwise the CPUs themselves do."""

    uses_ray = True
    QUEUED_PER_WORKER = 1
    RESERVE_TIMEOUT_S = 120.0

    def __init__(self, workers: int):
        self.workers = workers

    @contextlib.contextmanager
    def _remote(self, fn_options: dict):
        import ray

        if self.workers >= _cluster_cpus():
            yield ray.remote(**fn_options)(_call)
            return
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = placement_group([{"CPU": 1}] * self.workers)
        try:
            try:
                ray.get(group.ready(), timeout=self.RESERVE_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                raise PrepError(f"prep: the Ray cluster did not free {self.workers} CPUs for "
                                f"prep in {self.RESERVE_TIMEOUT_S:.0f} s (it has "
                                f"{_cluster_cpus()}, others may be busy); lower --workers or "
                                f"wait for other jobs") from None
            strategy = PlacementGroupSchedulingStrategy(group)
            yield ray.remote(scheduling_strategy=strategy, **fn_options)(_call)
        finally:
            remove_placement_group(group)

    def imap_unordered(self, fn: Callable, items: Iterable, shared: Any) -> Iterator:
        import ray

        todo = list(enumerate(items))
        if not todo:
            return
        todo.reverse()
        window = self.workers * (1 + self.QUEUED_PER_WORKER)
        pending: dict = {}
        with self._remote(dict(num_cpus=1, max_retries=1)) as remote:
            shared_ref = ray.put(shared)
            try:
                while todo or pending:
                    while todo and len(pending) < window:
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
    """The task's result; a user error raised in a worker comes back as the same one-line
    PrepError, a worker killed under the task (out of memory, crashed) as a PrepError
    with the fix. Anything else is a bug and keeps its traceback."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, PrepError):
            raise PrepError(str(cause)) from None
        raise
    except (ray.exceptions.OutOfMemoryError, ray.exceptions.WorkerCrashedError) as err:
        what = "ran out of memory" if isinstance(err, ray.exceptions.OutOfMemoryError) \
            else "lost its worker process"
        raise PrepError(f"prep: a Ray task {what} (twice: it is retried once); fix: lower "
                        f"--workers (or prep.workers) or prep.docs_per_shard, or give the "
                        f"nodes more memory; rerun to reuse the finished chunks") from None


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
