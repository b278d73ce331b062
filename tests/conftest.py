"""Fixtures shared by every test package."""

pytest_plugins = ["tests.postgres_cluster"]
