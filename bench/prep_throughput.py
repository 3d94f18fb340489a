"""End-to-end prep throughput on the real corpus against the raw tokenizer ceiling.

    .venv/bin/python bench/prep_throughput.py [--sources wiki_summaries bbc_news ...]

Prints one JSON line: end-to-end tokens/s of `run_prep` with 1 and 2 Ray workers (one
local Ray session, started once; its start-up time is reported apart), the batched fast
tokenizer's tokens/s on one thread over the same normalised text (the ceiling), the
ratios, and the peak resident memory of the driver and of the Ray workers.

Targets: end-to-end >= 80% of the ceiling per worker; 2 workers >= 1.7x one worker.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per worker, and here
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class PeakRss:
    """Samples the RSS of this process and of its Ray worker processes (`ray::...`)."""

    def __init__(self, every_s: float = 0.1):
        import psutil

        self.me = psutil.Process()
        self.every_s = every_s
        self.driver = self.workers = self.total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        driver = self.me.memory_info().rss
        workers = 0
        for p in self.me.children(recursive=True):
            try:
                if p.name().startswith("ray::") or "default_worker" in " ".join(p.cmdline()):
                    workers += p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        self.driver = max(self.driver, driver)
        self.workers = max(self.workers, workers)
        self.total = max(self.total, driver + workers)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def tokenizer_ceiling(sources: list[str], tokenizer: str, batch: int = 256) -> dict:
    """Batched fast tokenizer on one thread over the normalised documents (timed: the
    tokenizer calls only)."""
    from transformers import AutoTokenizer

    from distill_common.assets import resolve_model_dir
    from distill_common.corpora import iter_documents
    from distill_common.textnorm import normalize_text

    tok = AutoTokenizer.from_pretrained(str(resolve_model_dir(tokenizer)))
    texts = [normalize_text(d.text) for s in sources for d in iter_documents(s)]
    texts = [t for t in texts if t]
    tokens, seconds, cpu = 0, 0.0, 0.0
    for i in range(0, len(texts), batch):
        chunk = texts[i:i + batch]
        start, cpu_start = time.perf_counter(), time.process_time()
        ids = tok(chunk, add_special_tokens=False)["input_ids"]
        seconds += time.perf_counter() - start
        cpu += time.process_time() - cpu_start
        tokens += sum(len(x) for x in ids)
    return {"documents": len(texts), "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": tokens / seconds, "tokens_per_cpu_s": tokens / cpu}


def end_to_end(sources: list[str], tokenizer: str, workers: int, out: Path,
               docs_per_shard: int, seq_len: int) -> dict:
    from data_prep import run_prep
    from data_prep.config import PrepConfig

    if out.exists():
        shutil.rmtree(out)  # no resume: every run does all the work
    cfg = PrepConfig(sources=sources, output_dir=str(out), seq_len=seq_len,
                     docs_per_shard=docs_per_shard, validation_fraction=0.01, min_tokens=1,
                     progress_every_s=5.0)
    with PeakRss() as rss:
        start, cpu_start = time.perf_counter(), time.process_time()
        manifest = run_prep(cfg, tokenizer, workers=workers)
        seconds = time.perf_counter() - start
        driver_cpu = time.process_time() - cpu_start
    tokens = manifest["run"]["content_tokens"]
    # Ray's own processes are not counted: the driver's and the tasks' CPU time only.
    cpu = driver_cpu + manifest["run"]["task_cpu_seconds"]
    return {"workers": workers, "seconds": round(seconds, 3), "tokens": tokens,
            "tokens_per_s": tokens / seconds, "tokens_per_cpu_s": tokens / cpu,
            "documents_per_s": manifest["documents"]["kept"] / seconds,
            "chunks": manifest["run"]["chunks"],
            "phases_s": {k: manifest["run"][k] for k in
                         ("scan_seconds", "chunks_seconds", "chunk_task_seconds")},
            "peak_rss_mb": {"driver": rss.driver >> 20, "workers": rss.workers >> 20,
                            "driver_plus_workers": rss.total >> 20},
            "shards_sha": [s["sha256"][:12] for s in manifest["splits"]["train"]["shards"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sources", nargs="+",
                    default=["wiki_summaries", "bbc_news", "wordnet_glosses"])
    ap.add_argument("--tokenizer", default="minilm_l6")
    ap.add_argument("--docs-per-shard", type=int, default=4000)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()

    import ray

    # The machine is shared: measure the ceiling before and after the runs, keep the mean.
    ceiling_before = tokenizer_ceiling(args.sources, args.tokenizer)
    temp = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    start = time.perf_counter()
    ray.init(num_cpus=2, object_store_memory=256 << 20, _temp_dir=str(temp / "ray"),
             include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    ray_start = time.perf_counter() - start
    try:
        runs = {w: end_to_end(args.sources, args.tokenizer, w, temp / f"out{w}",
                              args.docs_per_shard, args.seq_len) for w in (1, 2)}
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    ceiling_after = tokenizer_ceiling(args.sources, args.tokenizer)
    ceiling = {**ceiling_after, **{k: (ceiling_before[k] + ceiling_after[k]) / 2
                                   for k in ("tokens_per_s", "tokens_per_cpu_s")}}
    one, two = runs[1], runs[2]
    result = {
        "bench": "prep_throughput",
        "sources": args.sources, "tokenizer": args.tokenizer, "seq_len": args.seq_len,
        "cpus": os.cpu_count(),
        "ceiling_tokens_per_s": round(ceiling["tokens_per_s"]),
        "ceiling_tokens": ceiling["tokens"],
        "ceiling_before_after_tokens_per_s": [round(ceiling_before["tokens_per_s"]),
                                              round(ceiling_after["tokens_per_s"])],
        "e2e_1_worker_tokens_per_s": round(one["tokens_per_s"]),
        "e2e_2_workers_tokens_per_s": round(two["tokens_per_s"]),
        "e2e_tokens": one["tokens"],
        "seconds": {"1_worker": one["seconds"], "2_workers": two["seconds"],
                    "ray_start": round(ray_start, 2), "ceiling": ceiling["seconds"]},
        "ratio_1_worker_vs_ceiling": round(one["tokens_per_s"] / ceiling["tokens_per_s"], 3),
        "ratio_2_workers_vs_2x_ceiling": round(
            two["tokens_per_s"] / (2 * ceiling["tokens_per_s"]), 3),
        "speedup_2_vs_1": round(two["tokens_per_s"] / one["tokens_per_s"], 3),
        # Per CPU-second, so other users of a shared machine do not skew it: the share of
        # the work that is the tokenizer itself.
        "ceiling_tokens_per_cpu_s": round(ceiling["tokens_per_cpu_s"]),
        "e2e_tokens_per_cpu_s": {"1_worker": round(one["tokens_per_cpu_s"]),
                                 "2_workers": round(two["tokens_per_cpu_s"])},
        "cpu_efficiency_vs_ceiling": {
            "1_worker": round(one["tokens_per_cpu_s"] / ceiling["tokens_per_cpu_s"], 3),
            "2_workers": round(two["tokens_per_cpu_s"] / ceiling["tokens_per_cpu_s"], 3)},
        # chunk_task_seconds (summed over tasks) against chunks_seconds (wall): with 2
        # workers on a free 2-core machine the sum stays the same and the wall halves.
        "phases_s": {"1_worker": one["phases_s"], "2_workers": two["phases_s"]},
        "peak_rss_mb": {"1_worker": one["peak_rss_mb"], "2_workers": two["peak_rss_mb"]},
        "chunks": one["chunks"],
        "identical_shards_1_vs_2": one["shards_sha"] == two["shards_sha"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
