"""Shared test set-up. Service fixtures (a local Ray cluster, an `mlflow server`,
a moto S3 server) live in their own modules and start once per session."""

import importlib.util
import os

import pytest

# Service fixtures load only where their service is installed: a GPU box with
# only torch (benchmarks/gpu_check.sh) still runs the model tests.
_SERVICES = {"tests.fixtures_ray": "ray", "tests.fixtures_mlflow": "mlflow", "tests.fixtures_s3": "moto"}
pytest_plugins = [plugin for plugin, package in _SERVICES.items() if importlib.util.find_spec(package)]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Corpora and tokenizers built by tests go to a session temp dir, not ~/.cache."""
    if "LRT_CACHE" not in os.environ:
        os.environ["LRT_CACHE"] = str(tmp_path_factory.mktemp("lrt_cache"))
    yield
