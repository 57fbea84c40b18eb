"""Multi-host start-up on JAX's multi-controller runtime (`jax.distributed.initialize`).

The same script runs on every host; each process owns its local devices and one slice of every
global batch. Three ways in:

  * explicit: `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (any cluster, and
    2 processes on 127.0.0.1 in the tests);
  * `--multihost`: JAX detects the cluster itself (Cloud TPU VMs and GKE, SLURM, Open MPI);
  * automatic: inside a SLURM step with more than one task, or on a multi-host TPU slice whose
    environment names its workers, the same as `--multihost`.

Failure is bounded, never a hang: a coordinator that cannot be reached is a clear error after
`init_timeout_s`; once running, a process that dies (or stops sending heartbeats for
`heartbeat_timeout_s`) makes the runtime terminate every other process with a non-zero status.
On CPU, cross-process collectives use gloo.
"""
from __future__ import annotations

import errno
import os
import socket
import time

HEARTBEAT_TIMEOUT_S = 60
INIT_TIMEOUT_S = 300
SHUTDOWN_TIMEOUT_S = 60


class DistributedError(RuntimeError):
  """Multi-host start-up failed; the message says what to check."""


def parse_address(address: str) -> tuple[str, int]:
  host, sep, port = (address or '').rpartition(':')
  host = host.strip('[]')
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise DistributedError(f'--coordinator_address={address!r} is not HOST:PORT '
                           '(e.g. 10.0.0.2:1234, the address of process 0)')
  return host, int(port)


def wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Returns once a TCP connection to `address` succeeds; DistributedError after `timeout_s`."""
  host, port = parse_address(address)
  deadline = time.monotonic() + timeout_s
  last = 'no attempt'
  while True:
    try:
      with socket.create_connection((host, port), timeout=min(5.0, max(timeout_s, 0.1))):
        return
    except OSError as e:
      last = e.strerror or str(e)
    if time.monotonic() >= deadline:
      raise DistributedError(
          f'cannot reach the coordinator at {address} within {timeout_s:g} s ({last}). Check '
          'that process 0 is running with the same --coordinator_address, that HOST:PORT is '
          "process 0's address, and that the port is open between the hosts.")
    time.sleep(0.25)


def _check_port_free(address: str) -> None:
  _, port = parse_address(address)
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(('', port))
    except OSError as e:
      if e.errno == errno.EADDRINUSE:
        raise DistributedError(
            f'process 0 cannot serve the coordinator on port {port}: it is in use (another run '
            'still going?). Pick another port in --coordinator_address.') from e


def detect_cluster() -> str | None:
  """The cluster JAX can configure itself from, judged from the environment (no network)."""
  env = os.environ
  ntasks = env.get('SLURM_STEP_NUM_TASKS') or env.get('SLURM_NTASKS')
  if 'SLURM_JOB_ID' in env and 'SLURM_PROCID' in env and ntasks and int(ntasks) > 1:
    return 'slurm'
  if int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return 'ompi'
  hosts = env.get('TPU_WORKER_HOSTNAMES') or env.get('TPU_PROCESS_ADDRESSES') or ''
  if ',' in hosts or env.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return 'tpu'
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto_detect: bool = False,
               heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
               init_timeout_s: int = INIT_TIMEOUT_S,
               shutdown_timeout_s: int = SHUTDOWN_TIMEOUT_S) -> bool:
  """Joins the multi-controller runtime if this is a multi-process run; returns whether it did.

  With no arguments and no cluster in the environment this is a no-op (one process). Call it
  before anything touches a JAX device.
  """
  explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
  cluster = None if explicit else detect_cluster()
  if not (explicit or auto_detect or cluster):
    return False
  import jax  # pylint: disable=g-import-not-at-top
  if jax.distributed.is_initialized():
    return True
  if explicit:
    missing = [n for n, v in (('--coordinator_address', coordinator_address),
                              ('--num_processes', num_processes),
                              ('--process_id', process_id)) if v is None]
    if missing:
      raise DistributedError(f'multi-host needs all of --coordinator_address, --num_processes '
                             f'and --process_id; missing {", ".join(missing)}')
    parse_address(coordinator_address)
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise DistributedError(f'--process_id={process_id} is not in [0, --num_processes='
                             f'{num_processes})')
    if process_id == 0:
      _check_port_free(coordinator_address)
    else:
      wait_for_coordinator(coordinator_address, init_timeout_s)
  # Cross-process collectives of CPU devices (the tests, CPU clusters); no effect on GPU/TPU.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=init_timeout_s,
                               heartbeat_timeout_seconds=heartbeat_timeout_s,
                               shutdown_timeout_seconds=shutdown_timeout_s)
  except (ValueError, RuntimeError) as e:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if not explicit and 'should be defined' in first:
      raise DistributedError(
          f'{"--multihost" if auto_detect else cluster}: JAX found no cluster to join (Cloud TPU, '
          'SLURM, Open MPI, Kubernetes) — give --coordinator_address, --num_processes and '
          f'--process_id instead ({first})') from e
    how = 'explicit flags' if explicit else f'auto-detection ({cluster or "--multihost"})'
    raise DistributedError(f'jax.distributed.initialize failed with {how}: {first}') from e
  return True


BARRIER_TIMEOUT_S = 3600
_barriers = 0


def barrier(name: str, timeout_s: int = BARRIER_TIMEOUT_S) -> None:
  """Waits until every process gets here (the coordination service's barrier, not a collective)."""
  global _barriers
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = jax_distributed.global_state.client
  if jax.process_count() == 1 or client is None:
    return
  _barriers += 1  # every process creates the same barriers in the same order (SPMD)
  client.wait_at_barrier(f'pathways_jax/{name}/{_barriers}', timeout_s * 1000)


def compile_then_sync(jitted, name: str):
  """`jitted`, whose first call in a multi-process run compiles, waits for every process, runs.

  CPU collectives (gloo) give processes 30 s (fixed in jaxlib) to meet at the first collective of
  a device group; a process still compiling longer than that on a busy host fails the run. The
  barrier has no such limit. The compiled executable is cached, so the call itself does not
  compile again. One process: `jitted` unchanged.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return jitted
  compiled = []

  def call(*args):
    if not compiled:
      jitted.lower(*args).compile()
      barrier(name)
      compiled.append(True)
    return jitted(*args)

  call.lower = jitted.lower
  return call
