"""Settings: defaults, units, and errors that name the key."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import ImproperlyConfigured

from celery_jobreaper import ConfigurationError, Settings


def make(**conf: Any) -> Settings:
    app = Celery("t", set_as_current=False)
    app.conf.jobreaper_database_url = "sqlite://"
    for key, value in conf.items():
        app.conf[f"jobreaper_{key}"] = value
    return Settings.from_app(app)


def test_defaults_are_documented_values() -> None:
    s = make()
    assert (s.heartbeat_interval, s.heartbeat_timeout, s.interval) == (5.0, 20.0, 10.0)
    assert s.lease_timeout == 15.0 and s.lead is True  # three heartbeat intervals
    assert s.max_age is None and s.grace == 0.0 and s.dry_run is False and s.strict is False
    assert s.track_tasks is True and s.create_tables is True


def test_lease_timeout_follows_the_heartbeat_and_must_exceed_it() -> None:
    assert make(heartbeat_interval=2, heartbeat_timeout=10).lease_timeout == 6.0
    assert make(lease_timeout=timedelta(seconds=30)).lease_timeout == 30.0
    with pytest.raises(ConfigurationError, match="jobreaper_lease_timeout"):
        make(lease_timeout=5)  # not above the default heartbeat interval (5 s)
    with pytest.raises(ConfigurationError, match="jobreaper_lead"):
        make(lead="maybe")


def test_durations_accept_seconds_and_timedelta() -> None:
    s = make(interval=timedelta(minutes=2), heartbeat_interval="5", max_age=86400)
    assert (s.interval, s.heartbeat_interval, s.max_age) == (120.0, 5.0, 86400.0)


@pytest.mark.parametrize(
    ("key", "value", "expect"),
    [
        ("interval", -5, "jobreaper_interval"),
        ("interval", 0, "jobreaper_interval"),
        ("heartbeat_interval", "soon", "jobreaper_heartbeat_interval"),
        ("heartbeat_timeout", 5, "jobreaper_heartbeat_timeout"),
        ("grace", True, "jobreaper_grace"),
        ("batch_size", 0, "jobreaper_batch_size"),
        ("dry_run", "maybe", "jobreaper_dry_run"),
        ("policies", {"scan.*": "delete"}, "jobreaper_policies['scan.*']"),
        ("queue_cleanup", "everything", "jobreaper_queue_cleanup"),
        ("sources", [{"id": "job_id"}], "jobreaper_sources[0].table"),
        ("sources", [{"table": "t", "colour": "x"}], "jobreaper_sources[0].colour"),
        ("sources", [{"table": "t", "status": 3}], "jobreaper_sources[0].status"),
        (
            "sources",
            [{"table": "t", "stale_statuses": "running"}],
            "jobreaper_sources[0].stale_statuses",
        ),
        (
            "sources",
            [{"table": "t", "failed_status": "running"}],
            "jobreaper_sources[0].failed_status",
        ),
    ],
)
def test_invalid_values_name_the_key(key: str, value: Any, expect: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        make(**{key: value})
    assert info.value.key == expect
    assert expect in str(info.value)
    assert isinstance(info.value, ImproperlyConfigured)  # Celery's own error class


def test_database_url_is_required_when_enabled() -> None:
    app = Celery("t", set_as_current=False)
    with pytest.raises(ConfigurationError, match="jobreaper_database_url"):
        Settings.from_app(app)
    app.conf.jobreaper_enabled = False
    assert Settings.from_app(app).enabled is False


def test_django_style_keys_work() -> None:
    app = Celery("t", set_as_current=False)
    app.config_from_object(
        {"CELERY_JOBREAPER_DATABASE_URL": "sqlite://", "CELERY_JOBREAPER_INTERVAL": 7},
        namespace="CELERY",
    )
    assert Settings.from_app(app).interval == 7.0


def test_policies_first_matching_glob_wins() -> None:
    s = make(policies={"system.*": "ignore", "*": "fail"})
    assert s.policy_for("system.backup") == "ignore"
    assert s.policy_for("library_scan") == "fail"
    assert s.policy_for(None) == "fail"


def test_task_name_globs_select_tracked_tasks() -> None:
    s = make(track_task_names=["proj.*"])
    assert s.tracks("proj.add") and not s.tracks("other.add")
    assert not make(track_tasks=False).tracks("proj.add")


def test_unusable_database_url_names_the_key() -> None:
    from celery_jobreaper.database import Database

    for url in ("not a url", "nosuchdialect://x/y"):
        with pytest.raises(ConfigurationError) as info:
            Database.from_settings(make(database_url=url))
        assert info.value.key == "jobreaper_database_url"
