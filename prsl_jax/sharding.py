"""Data parallelism: one Mesh over every device of every host, axis 'data'.

Params and optimizer state are replicated (P()); batches are split over 'data'
(P('data')). Steps are written per shard with jax.shard_map and average their
gradients with lax.pmean.
"""

import math
import threading
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


# Seconds jax.distributed.initialize keeps retrying after our own deadline has
# passed: JAX aborts the process (a C++ stack dump) when its own timeout expires,
# so ours must always come first.
_JAX_TIMEOUT_MARGIN_S = 60


class DistributedStartError(TimeoutError):
  """The processes of a multi-host run did not all meet within the timeout."""


def parse_coordinator_address(address: str):
  """'host:port' -> (host, port); a one-line ValueError for anything else."""
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"--coordinator_address={address!r} must be host:port (e.g. "
                     "10.0.0.2:1234, the address of process 0 and a free port on it) or "
                     "'auto' (TPU pods, SLURM)")
  return host, int(port)


def maybe_initialize_distributed(coordinator_address=None, num_processes=None,
                                 process_id=None, *, timeout_s=None):
  """jax.distributed.initialize for multi-host runs; a no-op for one process.

  On TPU pods and SLURM/GPU clusters JAX finds the coordinator itself: pass
  coordinator_address='auto'. For explicit launches (e.g. two processes on
  localhost) give all three arguments.

  timeout_s: seconds to wait for every process to join (None: JAX's own 300 s).
  The wait runs in a thread so that Ctrl-C is honoured; a launch that has not
  met by then raises DistributedStartError naming the address. The thread
  cannot be cancelled: the caller should exit the process after that error.
  """
  if coordinator_address is None:
    return
  kwargs = {}
  if coordinator_address != "auto":
    parse_coordinator_address(coordinator_address)
    if num_processes is None or process_id is None:
      raise ValueError(f"--coordinator_address={coordinator_address} needs --num_processes "
                       "and --process_id (or use --coordinator_address=auto on TPU pods "
                       "and SLURM)")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, --num_processes="
                       f"{num_processes})")
    # CPU collectives across processes need gloo (the default has none); the
    # setting only affects the CPU client, so it is harmless on GPU hosts. It must
    # precede any backend initialisation, hence no platform check here.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
  if timeout_s is None:
    jax.distributed.initialize(**kwargs)
    return
  kwargs["initialization_timeout"] = int(math.ceil(timeout_s)) + _JAX_TIMEOUT_MARGIN_S
  errors = []
  def start():
    try:
      jax.distributed.initialize(**kwargs)
    except BaseException as e:  # pylint: disable=broad-except  # re-raised below
      errors.append(e)
  thread = threading.Thread(target=start, name="jax-distributed-start", daemon=True)
  thread.start()
  deadline = time.monotonic() + timeout_s
  while thread.is_alive() and time.monotonic() < deadline:
    thread.join(0.1)  # short joins: KeyboardInterrupt reaches this thread between them
  if thread.is_alive():
    who = (f"process {process_id} of {num_processes}" if process_id is not None
           else "this process")
    raise DistributedStartError(
        f"the multi-host start-up did not complete within {timeout_s:g} s ({who}, "
        f"coordinator {coordinator_address}): check that every process was launched with "
        "the same --coordinator_address and --num_processes and its own --process_id, "
        "that process 0 runs on that host and the port is free there and reachable from "
        "here (firewall); big pods may need longer: --distributed_timeout=SECONDS")
  if errors:
    raise errors[0]


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all (global) devices, axis 'data', Auto axis type."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA,))


def replicate(tree, mesh: Mesh, *, copy: bool = True):
  """A pytree of host or device arrays on every device of the mesh.

  copy=True (training) always copies (may_alias=False): the train state is donated
  to the step, and without the copy a one-device run would delete the caller's
  arrays (e.g. the pretrained params that the next run starts from). Evaluation
  donates nothing and passes copy=False, so arrays already in place are reused
  instead of doubling the params in memory.
  """
  sharding = NamedSharding(mesh, P())
  def put(x):
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
      # Typed keys take another device_put path, which refuses a multi-host
      # sharding: replicate the key's data and wrap it again.
      return jax.random.wrap_key_data(put(jax.random.key_data(x)),
                                      impl=jax.random.key_impl(x))
    return jax.device_put(x, sharding, may_alias=False if copy else None)
  return jax.tree.map(put, tree)


def to_global(local_batch, mesh: Mesh):
  """This process's rows -> global arrays split over 'data': the one host-to-device path.

  Args:
    local_batch: pytree of numpy arrays with leading dim B / process_count (for
      one process, the whole batch).
    mesh: the data mesh.

  Returns:
    pytree of global jax.Arrays with leading dim B, sharded P('data').
  """
  n_local = len(mesh.local_devices)
  def put(x):
    if x.shape[0] % n_local:
      raise ValueError(
          f"per-process batch {x.shape[0]} must be divisible by the {n_local} local "
          f"devices (global batch = per-process batch x {jax.process_count()} processes)")
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P(DATA)), x)
  return jax.tree.map(put, local_batch)


def process_rows(global_batch):
  """A pytree of full global batches (the same on every process) -> this process's rows.

  Evaluation reads the whole batch on every process; `to_global(process_rows(b), mesh)`
  then takes the same path to the devices as training does.
  """
  count, index = jax.process_count(), jax.process_index()
  def take(x):
    rows = x.shape[0] // count
    return x[index * rows:(index + 1) * rows]
  return jax.tree.map(take, global_batch)


def put_eval_batch(global_batch, mesh: Optional[Mesh]):
  """A full batch read on every process -> device arrays for an eval step.

  With a mesh: this process's rows as global arrays split over 'data' (the path
  training takes); without one: plain arrays on the default device.
  """
  if mesh is None:
    return jax.tree.map(jnp.asarray, global_batch)
  return to_global(process_rows(global_batch), mesh)


def check_global_batch(global_batch_size: int, mesh: Mesh):
  """Fails early, with the numbers, if the batch cannot be split evenly."""
  n = mesh.devices.size
  if global_batch_size % n or global_batch_size % jax.process_count():
    raise ValueError(
        f"batch_size={global_batch_size} must be divisible by the number of devices "
        f"({n}) and of processes ({jax.process_count()})")
