"""setup.cfg lists every package: an editable install (what the tests run) finds modules that a plain
``pip install .`` would leave out, so nothing else would notice a missing entry."""
import configparser
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _on_disk(top: str, name: str) -> set[str]:
  found = set()
  for d, _, files in os.walk(os.path.join(ROOT, top)):
    if "__init__.py" in files:
      rel = os.path.relpath(d, os.path.join(ROOT, top))
      found.add(name if rel == "." else name + "." + rel.replace(os.sep, "."))
  return found


def test_setup_cfg_lists_every_package():
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(ROOT, "setup.cfg"))
  listed = set(cfg["options"]["packages"].split())
  lines = cfg["options"]["package_dir"].strip().splitlines()
  dirs = {k.strip(): v.strip() for k, v in (line.split("=") for line in lines)}
  assert dirs["jalign.kernels"] == "kernels"
  expected = _on_disk("jalign", "jalign") | _on_disk("kernels", "jalign.kernels")
  assert listed == expected, (sorted(expected - listed), sorted(listed - expected))
