"""The lock file (requirements.lock) pins what setup.cfg asks for, and `make venv` installs it."""
import configparser
import importlib.metadata
import os
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from helpers import REPO


def _lock() -> dict[str, list[Requirement]]:
  """Package name -> its pinned lines (several where a pin depends on the platform)."""
  pins = {}
  with open(os.path.join(REPO, 'requirements.lock'), encoding='utf-8') as f:
    for line in f:
      line = line.split('#')[0].strip().rstrip('\\').strip()
      if not line or line.startswith('--'):
        continue
      req = Requirement(line)
      pins.setdefault(canonicalize_name(req.name), []).append(req)
  return pins


def _setup_cfg_requirements() -> list[Requirement]:
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(REPO, 'setup.cfg'))
  lines = cfg['options']['install_requires'].split('\n')
  lines += cfg['options.extras_require']['test'].split('\n')
  return [Requirement(x) for x in lines if x.strip()]


def _pinned_version(req: Requirement) -> str:
  (spec,) = req.specifier
  assert spec.operator == '==', req
  return spec.version


def test_every_requirement_of_setup_cfg_is_pinned_within_its_range():
  lock = _lock()
  for req in _setup_cfg_requirements():
    pins = lock.get(canonicalize_name(req.name))
    assert pins, f'{req.name} is in setup.cfg but not in requirements.lock: run `make lock`'
    for pin in pins:
      version = _pinned_version(pin)
      assert req.specifier.contains(version, prereleases=True), (
          f'requirements.lock pins {req.name}=={version}, outside setup.cfg\'s {req.specifier}: '
          'run `make lock`')


def test_every_pin_carries_hashes():
  """pip then checks every download against the lock (hash-checking mode)."""
  hashes, pin = {}, None
  with open(os.path.join(REPO, 'requirements.lock'), encoding='utf-8') as f:
    for line in f:
      if '==' in line and not line[0].isspace() and not line.startswith('#'):
        pin = line.split(' ')[0]
        hashes[pin] = 0
      elif line.strip().startswith('--hash=sha256:'):
        hashes[pin] += 1
  assert len(hashes) > 50 and all(hashes.values()), [p for p, n in hashes.items() if not n]


_MAKE_VENV = os.path.join(REPO, '.venv')


@pytest.mark.skipif(os.path.realpath(sys.prefix) != os.path.realpath(_MAKE_VENV)
                    or not os.path.exists(os.path.join(_MAKE_VENV, '.installed')),
                    reason="not running in the Makefile's .venv")
def test_the_makefile_venv_holds_exactly_the_locked_versions():
  """What CI tested is what a fresh clone gets: the venv `make venv` built is the lock."""
  wrong = []
  for name, pins in _lock().items():
    for pin in pins:
      if pin.marker is not None and not pin.marker.evaluate():
        continue
      try:
        installed = importlib.metadata.version(name)
      except importlib.metadata.PackageNotFoundError:
        wrong.append(f'{name}: not installed (locked {_pinned_version(pin)})')
        continue
      if installed != _pinned_version(pin):
        wrong.append(f'{name}: {installed} installed, {_pinned_version(pin)} locked')
  assert not wrong, 'the venv differs from requirements.lock (rebuild it: make clean venv):\n' + \
      '\n'.join(wrong)
