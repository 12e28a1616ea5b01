"""Pytest setup shared by every test file: simulated CPU devices for the sharding tests.

XLA reads this flag once, when JAX first initialises its backend, so it has to be set here,
before any test module imports jax.
"""
import os

# LLVM's optimisation level 0 for XLA's CPU code, and XLA's older (non-MLIR) fusion code generator: the
# suite is mostly compilation, and the tiny training step compiled in 21 s instead of 31 s at level 0,
# then in 10.2 s instead of 15.5 s with the older generator (2-core machine, --xla_cpu_max_isa=AVX2). The
# tests compare programs compiled alike, or against references with tolerances far above rounding.
# Added to the caller's XLA_FLAGS, so that e.g. `XLA_FLAGS=--xla_cpu_max_isa=AVX2 pytest` (the timing of a CPU
# without AVX-512) still gets them; a flag the caller sets wins.
_flags = os.environ.get("XLA_FLAGS", "").split()
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
              "--xla_cpu_use_fusion_emitters=false"):
    if not any(f.split("=")[0] == _flag.split("=")[0] for f in _flags):
        _flags.append(_flag)
os.environ["XLA_FLAGS"] = " ".join(_flags)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Several tests run train.py's identical step more than once (a run, then its resumption): JAX's
# persistent compilation cache compiles it once per test session instead of once per run.
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "align_test_jax_cache"))

# Not host.keep_freed_memory() (train.py's, bench.py's): with one malloc arena XLA compiles 30-50%
# slower (host.py), and the tests are mostly compilation. test_host.py turns it on in its own processes.
os.environ.setdefault("ALIGN_KEEP_FREED_MEMORY", "0")
