"""Django settings: ``django_celery_results`` installed, Celery settings in the ``CELERY_``
namespace (jobreaper's too: ``CELERY_JOBREAPER_…``)."""

from __future__ import annotations

import os

from sqlalchemy.engine import make_url

_url = make_url(os.environ["JR_DATABASE_URL"])
if _url.get_backend_name() in {"mysql", "mariadb"}:  # Django's MySQL backend on PyMySQL
    import pymysql

    pymysql.install_as_MySQLdb()
_ENGINES = {"postgresql": "postgresql", "mysql": "mysql", "mariadb": "mysql", "sqlite": "sqlite3"}

SECRET_KEY = "jobreaper-tests"
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = ["django_celery_results"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DATABASES = {
    "default": {
        "ENGINE": f"django.db.backends.{_ENGINES[_url.get_backend_name()]}",
        "NAME": _url.database,
        "USER": _url.username or "",
        "PASSWORD": _url.password or "",
        "HOST": _url.host or "",
        "PORT": str(_url.port or ""),
    }
}

CELERY_BROKER_URL = os.environ.get("JR_BROKER_URL", "memory://")
CELERY_RESULT_BACKEND = "django-db"
CELERY_TASK_TRACK_STARTED = True
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("JR_QUEUE", "celery")
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_JOBREAPER_DATABASE_URL = os.environ["JR_DATABASE_URL"]
CELERY_JOBREAPER_HEARTBEAT_INTERVAL = 1
# only "an earlier start of this worker is dead" settles a restarted worker's rows at once
CELERY_JOBREAPER_HEARTBEAT_TIMEOUT = 60
CELERY_JOBREAPER_INTERVAL = 1
CELERY_JOBREAPER_PING_TIMEOUT = 0.5
