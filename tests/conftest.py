import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 8 simulated CPU devices for the sharding tests; must happen before jax is imported anywhere. On a loaded
# 2-core machine the 8 devices' threads can reach a collective far apart, so XLA's CPU rendezvous gets 15 minutes
# before it aborts the process (its default is much shorter).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_collective_timeout_seconds=900"
                           " --xla_cpu_collective_call_terminate_timeout_seconds=900").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# The repository's top-level kernels/ (imported as jalign.kernels) must not shadow Hugging Face's `kernels`
# package, which transformers >= 5.25 imports: `python -m pytest` puts the repository root first on sys.path, so it
# comes off, and subprocesses (python -m / -c, whose cwd is the root) get PYTHONSAFEPATH.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]
os.environ["PYTHONSAFEPATH"] = "1"
sys.path.insert(0, os.path.join(ROOT, "tests"))
os.chdir(ROOT)  # configs refer to examples/ relative to the repository root


def pytest_configure(config):
  """Persistent compilation cache: the many short runs compile the same steps; subprocesses inherit it. One
  directory per pytest-xdist worker (JAX writes entries in place, so two processes must not share one); set before
  the test modules import jax."""
  workerinput = getattr(config, "workerinput", None)
  if workerinput is None and getattr(config.option, "numprocesses", None):
    return  # the xdist controller, whose environment the workers inherit: each worker sets its own
  worker = workerinput["workerid"] if workerinput else "main"
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".pytest_cache", "jax", worker))
