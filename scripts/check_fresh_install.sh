#!/usr/bin/env bash
# What a new user does first, checked on every test run (scripts/test.sh calls this):
# a throwaway venv, a plain `pip install` of this tree (no extras), `import celery_jobreaper`,
# then the README's demo end to end (SQLite + kombu's filesystem://, a real worker SIGKILLed
# mid-task and started again), with its output checked. Fails if any of that fails.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'fresh install: %s\n' "$*"; }

PY=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The files a fresh clone of this work tree would have (tracked, plus new files not ignored).
mkdir "$tmp/src"
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$tmp/src"

"$PY" -m venv "$tmp/venv"
log "pip install . (no extras) into a throwaway venv"
"$tmp/venv/bin/python" -m pip install -q --disable-pip-version-check "$tmp/src"

cd "$tmp"
if "$tmp/venv/bin/python" -c "import redis" 2>/dev/null; then
  log "ERROR: redis is importable without the [redis] extra; this check proves nothing"; exit 1
fi
"$tmp/venv/bin/python" -c "import celery_jobreaper; print('fresh install: import celery_jobreaper', celery_jobreaper.__version__, 'OK')"

log "python -m celery_jobreaper.demo"
status=0
"$tmp/venv/bin/python" -m celery_jobreaper.demo >"$tmp/demo.out" 2>&1 || status=$?
sed 's/^/    /' "$tmp/demo.out"
if [ "$status" != 0 ]; then log "ERROR: the demo exited with $status"; exit 1; fi
for expected in \
  'demo: OK: the startup reap settled 2 stale jobs' \
  'Clearing job: scan_library_123abc (library_scan) from system_jobs' \
  'Clearing job: identify_456def (file_identification) from system_jobs'; do
  if ! grep -qF -- "$expected" "$tmp/demo.out"; then
    log "ERROR: the demo's output lacks: $expected"; exit 1
  fi
done
# the job stuck since yesterday: failed with its age (a day and the seconds the demo took)
if ! grep -qE -- 'identify_456def \(file_identification\) running -> failed: Job reset by jobreaper: it was running for 1 day, 0:0[0-9]:[0-9]{2}' "$tmp/demo.out"; then
  log "ERROR: the demo's output does not show the day-old job failed with its age"; exit 1
fi
if ! grep -qE -- '^ +titledb_update_789ghi +completed' "$tmp/demo.out"; then
  log "ERROR: the demo's output does not show the finished job left completed"; exit 1
fi
log "OK"
