"""One local Ray cluster for the whole test session.

Design choices:
- Starting Ray costs seconds on 2 cores, so tests share one in-process
  cluster (`ray.init(address="local", num_cpus=2)`), started on first use and
  shut down at the end of the session. `address="local"` never attaches to a
  cluster someone else started on this machine.
- No dashboard (not needed in process, seconds to start) and a small object
  store: test trials only ship configs.
- The environment (LRT_CACHE from conftest, MLFLOW_* set by tests, the moto
  S3 endpoint and its credentials) is inherited by Ray's worker processes when
  the cluster starts, so those fixtures run first.
- The job-submission test (tests/test_infra_services.py) starts its own
  `ray start --head` cluster through infra/local/up instead; it does not use
  this fixture.

Example:
    def test_something(ray_cluster):
        assert ray_cluster["CPU"] == 2
"""

import importlib.util
import os

import pytest


@pytest.fixture(scope="session")
def ray_cluster(_isolated_cache, request):
    import ray

    if importlib.util.find_spec("moto"):  # S3 endpoint and credentials in the env before the workers start
        request.getfixturevalue("s3_endpoint")

    if ray.is_initialized():  # someone (a plugin, an earlier fixture) already started one: share it
        yield ray.cluster_resources()
        return
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024,
             log_to_driver=True)
    try:
        yield ray.cluster_resources()
    finally:
        ray.shutdown()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "ray_job: starts its own stack (infra/local/up: `ray start --head`, mlflow server, S3) and submits a job "
        "(deselect: -m 'not ray_job')")
