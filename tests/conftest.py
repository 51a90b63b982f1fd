"""Shared test set-up. Service fixtures (a local Ray cluster, an `mlflow server`,
a moto S3 server) live in their own modules and start once per session."""

import os

import pytest

pytest_plugins = ["tests.fixtures_ray", "tests.fixtures_mlflow", "tests.fixtures_s3"]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Corpora and tokenizers built by tests go to a session temp dir, not ~/.cache."""
    if "LRT_CACHE" not in os.environ:
        os.environ["LRT_CACHE"] = str(tmp_path_factory.mktemp("lrt_cache"))
    yield
