"""Fixtures shared by every test folder; each concern lives in its own module."""

pytest_plugins = [
    "tests.fixtures.services",
    "tests.fixtures.models",
    "tests.fixtures.s3",
    "tests.fixtures.celery",
]
