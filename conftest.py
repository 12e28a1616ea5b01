"""Pytest setup shared by every test file: simulated CPU devices for the sharding tests.

XLA reads this flag once, when JAX first initialises its backend, so it has to be set here,
before any test module imports jax.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Several tests run train.py's identical step more than once (a run, then its resumption): JAX's
# persistent compilation cache compiles it once per test session instead of once per run.
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "align_test_jax_cache"))
