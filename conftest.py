"""Test setup: 8 fake CPU devices so sharding is exercised for real, float32 matmuls exact."""
import os
import shutil
import tempfile

import pytest

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)  # wins over a user's own XLA_FLAGS
jax.config.update('jax_default_matmul_precision', 'highest')


# One XLA compilation cache for every launch.py subprocess of a test session (tests/test_launch.py
# subprocess_env): dozens of runs compile the same tiny programs, a few seconds each. The xdist
# controller makes the directory and hands it to its workers.
def pytest_configure(config):
  given = getattr(config, 'workerinput', {}).get('zoo_xla_cache')
  if given:
    os.environ['ZOO_TEST_XLA_CACHE'] = given
  elif 'ZOO_TEST_XLA_CACHE' not in os.environ:
    config._zoo_xla_cache = os.environ['ZOO_TEST_XLA_CACHE'] = tempfile.mkdtemp(
        prefix='zoo-test-xla-cache-')


def pytest_unconfigure(config):
  made = getattr(config, '_zoo_xla_cache', None)
  if made:
    shutil.rmtree(made, ignore_errors=True)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
  node.workerinput['zoo_xla_cache'] = os.environ['ZOO_TEST_XLA_CACHE']
