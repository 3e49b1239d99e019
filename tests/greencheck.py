"""Run as a script: under gevent's monkey-patching, jobreaper's real loop thread uses the
database and the broker while the hub's thread uses them too (``test_gevent.py``).

Usage: ``python greencheck.py DATABASE_URL BROKER_URL``; prints ``ok <n>`` on success.
"""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

import gevent  # noqa: E402
from celery import Celery  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from celery_jobreaper import native  # noqa: E402
from celery_jobreaper.broadcast import broadcast  # noqa: E402
from celery_jobreaper.database import Database  # noqa: E402


def main(db_url: str, broker_url: str) -> int:
    app = Celery("greencheck", broker=broker_url, set_as_current=False)
    db = Database(create_engine(db_url), owned=True)
    assert native.patched()

    def use() -> None:
        with db.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
        assert broadcast(app, "ping", reply=True, timeout=0.2) == []  # no worker listens

    # The hub's thread first: its pooled database connection and a pooled broker connection
    # (Celery's own broadcast publishes through the app's producer pool) are made here.
    use()
    app.control.broadcast("ping", reply=True, timeout=0.2)
    done: list[str] = []

    def tick() -> None:
        use()
        done.append("ok")
        if len(done) == 3:
            loop.stopping.set()

    loop = native.Loop("greencheck", 0.01, tick)
    loop.start()
    # Meanwhile greenlets of the hub's thread keep using the same objects.
    while loop.is_alive():
        gevent.joinall([gevent.spawn(use) for _ in range(3)])
    assert loop.join(30)
    db.dispose()
    app.close()
    print("ok", len(done))
    return 0 if len(done) == 3 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
