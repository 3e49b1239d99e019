"""A real Django project for the django-celery-results tests (``celery -A djangoproj worker``).

Configured by environment variables like ``tests/workerapp.py``: JR_DATABASE_URL (a SQLAlchemy
URL; Django's ``DATABASES`` is made from it, jobreaper uses it as it is), JR_BROKER_URL,
JR_QUEUE, JR_SIGNAL_DIR.
"""
