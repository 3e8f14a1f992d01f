"""Test setup: 8 fake CPU devices so sharding is exercised for real, float32 matmuls exact."""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)  # wins over a user's own XLA_FLAGS
jax.config.update('jax_default_matmul_precision', 'highest')
