#!/usr/bin/env bash
# The one test command (README "Running the tests"; .ci/run calls it):
#   1. installs what the tests need: Python packages into .venv, and — as root on Debian — any
#      missing local service (PostgreSQL, MariaDB, Redis, RabbitMQ);
#   2. starts each local service that is installed but not running;
#   3. runs lint (ruff), formatting check, types (mypy --strict), the first-run check of a new
#      user (scripts/check_fresh_install.sh: plain `pip install .` in a throwaway venv, import,
#      the README's demo end to end) and the whole pytest suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k seed). pytest runs in JR_TEST_PROCESSES
# processes (pytest-xdist; default 2, 0 = one process): the real-worker tests mostly wait.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'test.sh: %s\n' "$*"; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 name=$2 i
  for i in $(seq 1 120); do
    if port_open "$port"; then return 0; fi
    sleep 1
  done
  log "ERROR: $name did not open port $port"; return 1
}

APT_UPDATED=0
apt_install() {
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    log "ERROR: $* missing and cannot be installed here (need root on Debian); install it"; return 1
  fi
  if [ "$APT_UPDATED" = 0 ]; then apt-get update -qq; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_postgres() {
  local fresh=0
  if ! command -v pg_ctlcluster >/dev/null; then
    log "installing PostgreSQL"; apt_install postgresql; fresh=1
  fi
  if ! port_open 5432; then
    log "starting PostgreSQL"
    local version; version=$(ls /etc/postgresql | sort -V | tail -n 1)
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
    wait_port 5432 PostgreSQL
  fi
  if [ "$fresh" = 1 ]; then  # the tests connect as postgres over TCP without a password
    local hba; hba=$(su postgres -c "psql -Atc 'show hba_file'")
    sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    su postgres -c "psql -qc 'select pg_reload_conf()'" >/dev/null
  fi
}

ensure_mariadb() {
  local fresh=0
  if ! command -v mariadbd >/dev/null && [ ! -x /usr/sbin/mariadbd ]; then
    log "installing MariaDB"; apt_install mariadb-server; fresh=1
  fi
  if ! port_open 3306; then
    log "starting MariaDB"
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld 2>/dev/null || true
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
    wait_port 3306 MariaDB
  fi
  if [ "$fresh" = 1 ]; then  # root over TCP with an empty password, as on the project machines
    mariadb -uroot -e "ALTER USER root@localhost IDENTIFIED VIA mysql_native_password USING PASSWORD('') OR unix_socket; CREATE USER IF NOT EXISTS root@'127.0.0.1' IDENTIFIED BY ''; GRANT ALL ON *.* TO root@'127.0.0.1' WITH GRANT OPTION; FLUSH PRIVILEGES;"
  fi
}

ensure_redis() {
  if ! command -v redis-server >/dev/null; then log "installing Redis"; apt_install redis-server; fi
  if ! port_open 6379; then
    log "starting Redis"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log
    wait_port 6379 Redis
  fi
}

ensure_rabbitmq() {
  if ! command -v rabbitmq-server >/dev/null; then
    log "installing RabbitMQ"; apt_install rabbitmq-server
  fi
  if ! port_open 5672; then
    log "starting RabbitMQ"
    rabbitmq-server -detached
    wait_port 5672 RabbitMQ
  fi
}

ensure_postgres
ensure_mariadb
ensure_redis
ensure_rabbitmq

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
log "installing Python packages"
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

log "ruff check"; .venv/bin/ruff check .
log "ruff format --check"; .venv/bin/ruff format --check .
log "mypy --strict"; .venv/bin/mypy
log "fresh install and demo"; PYTHON="$PY" ./scripts/check_fresh_install.sh
PROCESSES=${JR_TEST_PROCESSES:-2}
log "pytest (pytest-xdist -n $PROCESSES)"
exec .venv/bin/python -m pytest -n "$PROCESSES" --dist loadgroup "$@"
