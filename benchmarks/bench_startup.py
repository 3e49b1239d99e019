"""Worker start overhead of the JobReaper step when nothing is stale.

Starts a real ``celery worker`` (``-P solo -l info --without-mingle --without-gossip``, Redis
db 14 as broker, a freshly created PostgreSQL database) again and again, interleaving:

- plugin:  the app of ``benchapp.py`` with celery_jobreaper installed, default settings (tracked
  jobs on, no user table)
- plugin+table: the same plus the seed-shaped ``system_jobs`` table as a source (it holds only
  finished jobs; the step reflects it at start)
- without: the same app and command line plus ``--without-jobreaper``
- bare:    (for information) the same app with celery_jobreaper not even imported

and measures from process spawn to the ``ready.`` log line. One warm-up start per variant
comes first (the plugin's creates its tables). Every worker is stopped with SIGTERM (warm
shutdown, so the plugin marks its incarnation stopped) and killed by process group if it does
not exit. Printed: the median of each, and plugin minus without (target <= 50 ms), for both
plugin variants.

    python benchmarks/bench_startup.py            # 7 starts of each
    python benchmarks/bench_startup.py 3          # quick

With ``--baseline DIR`` (a source tree of another celery_jobreaper version, e.g.
``git archive <commit> | tar -x -C DIR``) the two plugin variants also run with that tree's
package first on ``PYTHONPATH`` (``plugin@base``, ``plugin+table@base``), interleaved with the
rest, so before and after are measured side by side in one run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from _common import REDIS_URL, kill_group, median, stop, throwaway_database
from sqlalchemy import create_engine, text

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
READY = " ready."
VARIANTS = ("plugin", "plugin+table", "without", "bare")


REAP_LINE = re.compile(r"jobreaper: No stale jobs found \(startup, ([0-9.]+) s\)")
#: variant -> the startup reap's own duration as the plugin logs it (seconds)
reap_seconds: dict[str, list[float]] = {}


def start_worker(
    url: str, variant: str, queue: str, timeout: float = 60.0, baseline: Path | None = None
) -> float:
    """Start one worker, return seconds from spawn to its ``ready.`` line, then stop it.

    ``@base`` variants import celery_jobreaper from the *baseline* source tree."""
    root = baseline if variant.endswith("@base") and baseline is not None else ROOT
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), str(root)]),
        "PYTHONUNBUFFERED": "1",
        "JR_BENCH_BROKER": REDIS_URL,
        "JR_BENCH_DATABASE_URL": url,
        "JR_BENCH_QUEUE": queue,
        "JR_BENCH_SOURCE": "1" if variant.startswith("plugin+table") else "0",
        "JR_BENCH_INSTALL": "0" if variant == "bare" else "1",
    }
    env.pop("PYTHONWARNINGS", None)
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "benchapp",
        "worker",
        "-n",
        f"bench-{variant.replace('+', '-').replace('@', '-')}@%h",
        "-P",
        "solo",
        "-l",
        "info",
        "--without-mingle",
        "--without-gossip",
    ]
    if variant == "without":
        cmd.append("--without-jobreaper")
    began = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    ready = threading.Event()
    log: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            log.append(f"{(time.perf_counter() - began) * 1000:6.0f} {line}")
            if READY in line and not ready.is_set():
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not ready.wait(timeout):
            raise SystemExit(f"{variant} worker not ready after {timeout:g} s:\n{''.join(log)}")
        elapsed = time.perf_counter() - began
        if os.environ.get("JR_BENCH_VERBOSE"):
            print(f"--- {variant}\n{''.join(log)}", file=sys.stderr)
        reaped = [float(m.group(1)) for line in log if (m := REAP_LINE.search(line))]
        if variant.startswith("plugin"):
            if not reaped:
                raise SystemExit(f"the plugin did not reap at start:\n{''.join(log)}")
            reap_seconds.setdefault(variant, []).append(reaped[0])
        stop(proc, timeout=30)
        return elapsed
    finally:
        kill_group(proc)
        reader.join(timeout=5)


def setup(url: str) -> None:
    """The seed's table with finished jobs only (nothing stale)."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE system_jobs (job_id varchar(64) PRIMARY KEY, job_type varchar(64), "
                "status varchar(16) NOT NULL, started_at timestamp, completed_at timestamp, "
                "error text)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO system_jobs SELECT 'job_' || i, 'library_scan', 'completed', "
                "now() - interval '1 hour', now(), NULL FROM generate_series(1, 1000) AS i"
            )
        )
    engine.dispose()


def flush_redis() -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("starts", nargs="?", type=int, default=7, help="starts of each variant")
    parser.add_argument(
        "--baseline", type=Path, default=None, help="source tree to compare with (see above)"
    )
    args = parser.parse_args()
    baseline: Path | None = args.baseline
    variants = VARIANTS + (("plugin@base", "plugin+table@base") if baseline else ())
    queue = f"jrbench-{uuid.uuid4().hex[:8]}"
    times: dict[str, list[float]] = {v: [] for v in variants}
    flush_redis()
    try:
        with throwaway_database() as url:
            setup(url)
            for variant in variants:  # warm-up: tables, OS caches, .pyc files
                start_worker(url, variant, queue, baseline=baseline)
            reap_seconds.clear()
            for i in range(args.starts):
                order = variants if i % 2 == 0 else variants[::-1]
                for variant in order:
                    times[variant].append(start_worker(url, variant, queue, baseline=baseline))
    finally:
        flush_redis()
    plugin, table, without, bare = (median(times[v]) * 1000 for v in VARIANTS)
    print(f"bench_startup: {args.starts} starts each, interleaved; spawn -> 'ready.' (ms)")
    for variant in variants:
        runs = " ".join(f"{t * 1000:.0f}" for t in times[variant])
        print(f"  {variant:<18} median {median(times[variant]) * 1000:7.1f}   runs: {runs}")
    print(f"  step overhead, defaults   (plugin - without):       {plugin - without:+6.1f} ms")
    print(f"  step overhead, user table (plugin+table - without): {table - without:+6.1f} ms")
    if baseline:
        base_plugin, base_table = (
            median(times[v]) * 1000 for v in ("plugin@base", "plugin+table@base")
        )
        print(f"  baseline {baseline}:")
        print(f"    step overhead, defaults:   {base_plugin - without:+6.1f} ms")
        print(f"    step overhead, user table: {base_table - without:+6.1f} ms")
    print("  (target for the step overhead: <= 50 ms)")
    for variant, seconds in reap_seconds.items():
        logged = median(seconds) * 1000
        print(f"  {variant}: the startup reap itself, as logged: median {logged:.0f} ms")
    print(f"  import + install, information (without - bare):    {without - bare:+6.1f} ms")


if __name__ == "__main__":
    main()
