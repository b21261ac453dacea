"""jalign.hostmem: on CPU, XLA's per-call temporary buffers stop page-faulting once jalign is imported."""
import importlib.util
import json
import os
import platform
import subprocess
import sys

import pytest

from jalign import hostmem

# A jitted SGD step on an output layer (logits and their gradient, [4096, 8192] fp32, are XLA's temporary buffer,
# allocated on every call; the weights are donated, as jalign's train steps donate their state); prints the median
# minor page faults of calls 5-12 (glibc's heap settles over the first few).
CHILD = """
import resource, json, statistics, jalign, jax, jax.numpy as jnp
loss = lambda w, x: -jax.nn.log_softmax(x @ w)[:, 0].mean()
step = jax.jit(lambda w, x: w - 1e-3 * jax.grad(loss)(w, x), donate_argnums=0)
x, w = jnp.ones((4096, 256)), jnp.full((256, 8192), 1e-3)
faults = []
for _ in range(12):
  r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  w = step(w, x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print("FAULTS", json.dumps([jalign.hostmem.TUNED, statistics.median(faults[4:])]))
"""


def _faults_per_call(setting: str):
  env = dict(os.environ, JALIGN_HOST_MALLOC=setting, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True).stdout
  return json.loads(out.split("FAULTS", 1)[1])


def _transparent_huge_pages_always() -> bool:
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return "[always]" in f.read()
  except OSError:
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's mallopt")
def test_import_stops_per_call_page_faults():
  tuned, faults_on = _faults_per_call("1")
  untuned, faults_off = _faults_per_call("0")
  assert (tuned, untuned) == (True, False)
  assert faults_on < 1000, faults_on  # the temporary buffer is reused, not mapped afresh (measured: 0 to 1)
  if not _transparent_huge_pages_always():  # 4 KiB pages: glibc's defaults fault it in on every call (34,817)
    assert faults_off > 16000, faults_off


def test_wanted_follows_the_platform_and_the_switch():
  assert hostmem.wanted({"JAX_PLATFORMS": "cpu"})
  assert not hostmem.wanted({"JAX_PLATFORMS": "cuda"})
  assert not hostmem.wanted({"JAX_PLATFORMS": "cpu", "JALIGN_HOST_MALLOC": "0"})
  assert hostmem.wanted({"JAX_PLATFORMS": "cuda", "JALIGN_HOST_MALLOC": "1"})
  # no JAX_PLATFORMS: on unless an accelerator plugin is installed (none is in the test environment)
  assert hostmem.wanted({}) == all(importlib.util.find_spec(m) is None for m in hostmem.ACCELERATOR_MODULES)


def test_xla_flags_add_the_cpu_compile_level_once():
  assert hostmem.xla_flags("") == "--xla_backend_optimization_level=1"
  assert hostmem.xla_flags("--xla_force_host_platform_device_count=8") == (
      "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=1")
  assert hostmem.xla_flags("--xla_backend_optimization_level=3") == "--xla_backend_optimization_level=3"
  if hostmem.TUNED:  # this process: the level went into XLA_FLAGS on import
    assert "--xla_backend_optimization_level=1" in os.environ["XLA_FLAGS"]
