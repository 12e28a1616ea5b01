"""Pytest setup shared by every test file: simulated CPU devices for the sharding tests.

XLA reads this flag once, when JAX first initialises its backend, so it has to be set here,
before any test module imports jax.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
