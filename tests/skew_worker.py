"""One of two processes on 127.0.0.1 (tests/test_multihost.py); process 1 arrives late.

    python tests/skew_worker.py PROCESS_ID PORT DELAY_S

Process 1 sleeps DELAY_S before its first jitted call (as a host still compiling would). The
first call goes through `distributed.compile_then_sync`, so the late process is waited for at a
barrier rather than at gloo's first collective (which allows 30 s).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pathways_jax import distributed  # pylint: disable=g-import-not-at-top

pid, port, delay = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
distributed.initialize(f'127.0.0.1:{port}', 2, pid, heartbeat_timeout_s=30, init_timeout_s=60)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top,wrong-import-position

mesh = jax.make_mesh((jax.device_count(),), ('d',))
local = np.arange(jax.local_device_count(), dtype=np.float32) + pid * jax.local_device_count()
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P('d')), local)
total = distributed.compile_then_sync(
    jax.jit(lambda v: v.sum(), out_shardings=NamedSharding(mesh, P())), 'sum')
if pid == 1:
  time.sleep(delay)
print(f'process {pid}: sum {float(total(x))}', flush=True)
