"""Process-group setup for one process, `mpiexec -n N` (mpi4py) or `torchrun`, and the only place that
knows ranks: rank and world size, gathers of uneven batches and of Python objects, checkpoint broadcast.

setup_dist() always leaves torch.distributed initialised, with a world of one
when nothing launched several processes, so code that calls collectives (as the
original's scripts do) runs unchanged everywhere. Backends: NCCL for CUDA
tensors with Gloo for CPU ones when a GPU is present, Gloo alone otherwise.
"""

import os
import socket
import sys
import time

import torch as th
import torch.distributed as dist

from .checkpoints import CHECKPOINT_HINT, checkpoint_from_bytes, read_checkpoint
from .errors import MissingFileError, UserError
from .files import read_bytes

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def setup_dist():
    """Initialise torch.distributed from torchrun's variables, from MPI, or as a world of one."""
    if dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if th.cuda.is_available() else "gloo"
    if all(v in os.environ for v in _TORCHRUN_VARS):
        _set_cuda_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, init_method="env://")
        return
    comm = _mpi_comm()
    if comm is not None and comm.Get_size() > 1:
        _init_from_mpi(comm, backend)
        return
    _set_cuda_device(0)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def _mpi_comm():
    """MPI.COMM_WORLD, or None when mpi4py is missing or MPI cannot start."""
    try:
        from mpi4py import MPI  # imported lazily: MPI is optional
    except (ImportError, RuntimeError):
        return None
    return MPI.COMM_WORLD


def _init_from_mpi(comm, backend):
    """Rank and size from MPI; rank 0 picks the rendezvous address and broadcasts it."""
    rank, size = comm.Get_rank(), comm.Get_size()
    address = (_local_address(), _free_port()) if rank == 0 else None
    address = comm.bcast(address, root=0)
    local_rank = comm.Split_type(_mpi_shared_type()).Get_rank()
    os.environ.update(
        MASTER_ADDR=address[0],
        MASTER_PORT=str(address[1]),
        RANK=str(rank),
        WORLD_SIZE=str(size),
        LOCAL_RANK=str(local_rank),
    )
    _set_cuda_device(local_rank)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=size)


def _mpi_shared_type():
    from mpi4py import MPI

    return MPI.COMM_TYPE_SHARED


def _local_address():
    # Loopback when the hostname does not resolve (containers, laptops off-network).
    try:
        return socket.gethostbyname(socket.getfqdn())
    except OSError:
        return "127.0.0.1"


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _set_cuda_device(local_rank):
    # Respect the user's CUDA_VISIBLE_DEVICES; pick among the visible devices.
    if th.cuda.is_available():
        th.cuda.set_device(local_rank % th.cuda.device_count())


def dev():
    """The device this process computes on: its GPU, or the CPU."""
    if th.cuda.is_available():
        return th.device("cuda", th.cuda.current_device())
    return th.device("cpu")


def _initialized():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if _initialized() else 0


def get_world_size():
    return dist.get_world_size() if _initialized() else 1


def is_main_process():
    return get_rank() == 0


# Where each launcher puts a process's rank before any process group exists.
_LAUNCHER_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def launch_rank(comm=None):
    """This process's rank, also before setup_dist(): from `comm` (an mpi4py-like communicator) when
    given, else from the process group, else from the launcher's variables."""
    if comm is not None:
        return comm.Get_rank() if hasattr(comm, "Get_rank") else comm.rank
    if _initialized():
        return dist.get_rank()
    for name in _LAUNCHER_RANK_VARS:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


ABORT_RELAY_S = 0.5  # how long a rank's last output has to reach mpiexec before Abort


def abort_run(code):
    """End this process with exit status `code`, and under MPI every other rank of the job too.

    mpiexec waits for all ranks, and a rank blocked in a collective never returns, so MPI's
    Abort is the one way to end the job. torchrun ends the other ranks itself when one exits.
    """
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and get_world_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        # mpiexec relays each rank's output through a pipe, and Abort kills the relay too: give it a moment
        # to pass on the message just written, or the user sees the run end without a word.
        time.sleep(ABORT_RELAY_S)
        mpi.COMM_WORLD.Abort(code)
    sys.exit(code)


def barrier():
    if get_world_size() > 1:
        dist.barrier()


def gather_rows(x):
    """The rows of x from every rank, concatenated in rank order; ranks may hold different numbers of rows.

    all_gather needs equal shapes, so each rank pads to the largest count and the padding is cut off again.
    """
    world = get_world_size()
    if world == 1:
        return x
    count = th.tensor([x.shape[0]], dtype=th.int64, device=x.device)
    counts = [th.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]
    padded = th.cat([x, x.new_zeros((max(counts) - x.shape[0], *x.shape[1:]))])
    gathered = [th.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return th.cat([g[:n] for g, n in zip(gathered, counts)])


def gather_objects(obj, comm=None):
    """Every rank's picklable `obj`, as a list in rank order ([obj] alone).

    :param comm: an mpi4py-like communicator (with allgather) to use instead of torch.distributed.
    """
    if comm is not None:
        if not hasattr(comm, "allgather"):
            raise TypeError("comm must provide allgather(obj) -> list, like mpi4py")
        return comm.allgather(obj)
    world = get_world_size()
    if world == 1:
        return [obj]
    gathered = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def mean_over_ranks(x):
    """The mean over ranks of a tensor that each rank holds its own value of (a copy; x is unchanged)."""
    x = x.clone()
    if get_world_size() > 1:
        dist.all_reduce(x)
        x /= get_world_size()
    return x


def load_state_dict(path, **kwargs):
    """Read a checkpoint once on rank 0 and share its bytes; every rank loads with weights_only=True.

    :param kwargs: `map_location` is honoured, as the original passed it to torch.load.
    """
    state = read_checkpoint(path) if get_world_size() == 1 else _broadcast_checkpoint(path)
    map_location = kwargs.get("map_location")
    return _to_device(state, map_location) if map_location is not None else state


def _to_device(obj, device):
    """Move the tensors of a nested checkpoint (dicts, lists) to `device`."""
    if isinstance(obj, th.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _broadcast_checkpoint(path):
    """Rank 0 reads the file (a blob store is hit once) and broadcasts its bytes.

    A file rank 0 cannot read raises on every rank instead of leaving the others waiting.
    """
    state, payload, error = None, None, None
    if get_rank() == 0:
        try:
            data = read_bytes(path, "checkpoint", CHECKPOINT_HINT)
            state = checkpoint_from_bytes(data, source=path)
            payload = th.frombuffer(bytearray(data), dtype=th.uint8)
        except (OSError, ValueError) as exc:
            error = exc
    missing = isinstance(error, FileNotFoundError)
    size = th.tensor(
        [(-1 if missing else -2) if error else (0 if payload is None else payload.numel())], dtype=th.int64
    )
    dist.broadcast(size, 0)
    if size.item() < 0:  # the other ranks raise the same kind of error as rank 0
        failed = MissingFileError if size.item() == -1 else UserError
        raise error if error else failed(f"rank 0 could not read the checkpoint {path}; see its error")
    if payload is None:
        payload = th.empty(int(size.item()), dtype=th.uint8)
    dist.broadcast(payload, 0)
    return state if state is not None else checkpoint_from_bytes(payload.numpy().tobytes(), source=path)


def sync_params(params):
    """Make every rank hold rank 0's values of `params`."""
    if get_world_size() == 1:
        return
    for p in params:
        with th.no_grad():
            dist.broadcast(p, 0)
