"""Optional dependencies: which extra brings a client library, and one clear error without it.

``import celery_jobreaper`` needs only the base dependencies. A broker transport's or a
database's client library is imported only when that transport or database is used; when it
is missing, the error names the extra that installs it instead of a traceback from deep inside
kombu or SQLAlchemy.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import get_transport_cls
from kombu.utils.url import maybe_sanitize_url

from .errors import ConfigurationError

#: Extra of ``celery_jobreaper`` that installs the client library of a missing module.
EXTRA_OF_MODULE = {
    "redis": "redis",
    "psycopg": "postgres",
    "psycopg2": "postgres",
    "pymysql": "mysql",
}
#: Extra that installs everything a kombu transport imports (kombu's own ``[redis]`` extra).
EXTRA_OF_TRANSPORT = {"redis": "redis", "rediss": "redis", "sentinel": "redis"}


def install_hint(extra: str) -> str:
    """The command that installs *extra*."""
    return f'pip install "celery_jobreaper[{extra}]"'


def driver_hint(error: ImportError, url: str) -> str:
    """Advice for a database driver that failed to import, naming the extra when there is one."""
    missing = (error.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(missing)
    if extra is not None:
        return f"; install its driver: {install_hint(extra)}"
    if missing == "MySQLdb":
        return f"; use a mysql+pymysql:// URL and {install_hint('mysql')} (or install mysqlclient)"
    return f"; install the driver of {url.split(':', 1)[0]!r}"


def broker_transport(app: Any) -> str:
    """The kombu transport name of *app*'s broker (``redis``, ``amqp``, ``filesystem``…)."""
    conf = app.conf
    if conf.broker_transport:
        return str(conf.broker_transport)
    url = conf.broker_write_url or conf.broker_url or "amqp://"
    url = str(url).split(";", 1)[0].strip()
    return url.split("://", 1)[0].split("+", 1)[0] or "amqp"


def check_broker_transport(app: Any) -> None:
    """Raise :class:`ConfigurationError` naming the extra if the broker's client is missing.

    Nothing is connected: only the transport's module is imported, as kombu will anyway.
    """
    transport = broker_transport(app)
    try:
        get_transport_cls(transport)
    except ImportError as error:
        extra = EXTRA_OF_TRANSPORT.get(transport)
        missing = (error.name or "").split(".")[0]
        how = install_hint(extra) if extra else f"install the client library {missing!r}"
        url = maybe_sanitize_url(app.conf.broker_write_url or app.conf.broker_url)
        raise ConfigurationError(
            "broker_url",
            f"the {transport!r} transport of {url!r} cannot be loaded "
            f"(no module named {missing!r}): {how}",
        ) from error
