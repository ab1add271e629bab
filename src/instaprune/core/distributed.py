"""Multi-process training on PyTorch's own engine: ``torchrun`` environment, DDP wrapping, rank helpers.

``instaprune train`` runs unchanged under ``torchrun --nproc-per-node=N [--nnodes ... --rdzv-endpoint ...]``:
:func:`init_from_env` reads the variables torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``), initialises the default process group (``nccl`` when CUDA is available,
``gloo`` on CPU) and picks the device (``cuda:LOCAL_RANK`` or CPU). Without those variables it returns a
single-process environment and initialises nothing, so the same code path serves both.

Data sharding uses :func:`instaprune.data.shard_indices` (DistributedSampler semantics: the global epoch order
dealt round-robin, ``drop_last`` for training), so batch ``k`` of all ranks together is batch ``k`` of one
process with the global batch. Gradients are averaged by DDP; the feature-decay term lives in forward
pre-hooks on the *inner* model, so it is part of each rank's loss and needs nothing special.

SyncBatchNorm: torch runs it only on accelerators (CUDA/XPU/HPU); on CPU (gloo) a training-mode
SyncBatchNorm raises, so :func:`wrap_ddp` refuses ``sync_bn`` there with one clear message unless BatchNorm is
frozen (eval mode: running statistics, nothing to synchronise).
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from instaprune.core.errors import ConfigError

__all__ = [
    "DistEnv",
    "init_from_env",
    "current_env",
    "shutdown",
    "wrap_ddp",
    "freeze_batchnorm",
    "all_reduce_sum",
    "any_rank",
    "gather_objects",
    "global_mean",
    "gather_cat",
    "shard_dataset",
    "barrier",
    "maybe_no_sync",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: ``rank`` of ``world_size`` (``local_rank`` on its node), device, backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None  # None: no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and self.backend is not None

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size, "local_rank": self.local_rank,
                "device": self.device, "backend": self.backend}


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as e:
        raise ConfigError(f"environment variable {name} must be an integer, got {raw!r}") from e


def current_env() -> DistEnv:
    """The environment of an already initialised default process group (single process when none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistEnv()
    backend = str(dist.get_backend())
    local = _env_int("LOCAL_RANK", 0)
    device = f"cuda:{local}" if backend == "nccl" else "cpu"
    return DistEnv(dist.get_rank(), dist.get_world_size(), local, device, backend)


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> DistEnv:
    """Initialise ``torch.distributed`` from torchrun's environment variables; single process without them.

    ``backend``: ``nccl`` / ``gloo`` (default: nccl with CUDA, else gloo). Idempotent: an initialised process
    group is reused. Non-main ranks log only warnings from the ``instaprune`` logger (rank-0-only logging)."""
    if dist.is_available() and dist.is_initialized():
        return current_env()
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    if world <= 1:
        return DistEnv()
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world}")
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(var):
            raise ConfigError(f"WORLD_SIZE={world} but {var} is not set: launch with torchrun")
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
    backend = backend or ("nccl" if use_cuda else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ConfigError(f"distributed backend must be nccl or gloo, got {backend!r}")
    if backend == "nccl" and not use_cuda:
        raise ConfigError("the nccl backend needs CUDA devices; use gloo on CPU")
    device = "cpu"
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA devices are "
                              "visible")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
        kwargs["device_id"] = torch.device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = _attempt_store(rank, world, timeout)
    if store is not None:
        kwargs.update(store=store, rank=rank, world_size=world)
    dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    if rank != 0:
        logging.getLogger("instaprune").setLevel(logging.WARNING)
    env = DistEnv(rank, world, local, device, backend)
    log.info("process group initialised: %s", env.to_dict())
    return env


def _attempt_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store | None:
    """After a torchrun elastic restart (attempt >= 1, agent-hosted store): a client of the agent's store
    whose keys are prefixed by the attempt. The agent keeps one store across restarts, and the keys of the
    dead attempt's process group (the workers' gloo addresses) would otherwise be read by the restarted
    workers, which then hang or fail to connect (observed with torch 2.14, static and c10d rendezvous).
    The first attempt uses torch's default store handling."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt in (None, "0") or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                         timeout=timeout)
    return dist.PrefixStore(f"instaprune/attempt_{attempt}/", base)


def shutdown(sync: bool = False) -> None:
    """Destroy the default process group if one exists (safe to call always).

    ``sync`` (only after a successful run, when every rank gets here): a barrier first, so no rank tears its
    connections down while a peer is still using them."""
    if dist.is_available() and dist.is_initialized():
        if sync:
            dist.barrier()
        # DDP wrappers left in reference cycles keep the process group (and gloo's worker threads) alive until
        # interpreter finalization, where tearing them down can abort the process (SIGABRT, "terminate called
        # without an active exception", seen once in ~16 two-process runs): free them while Python is alive
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def freeze_batchnorm(model: nn.Module) -> int:
    """Put every BatchNorm layer in eval mode (running statistics used and not updated); returns the count.

    Affine parameters still train. Call after ``model.train()``, which would undo it."""
    count = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            count += 1
    return count


def wrap_ddp(net: nn.Module, env: DistEnv, sync_bn: bool = False, freeze_bn: bool = False) -> nn.Module:
    """``net`` wrapped in DistributedDataParallel (returned unchanged for a single process).

    ``sync_bn`` converts BatchNorm to SyncBatchNorm in place (keys of the state dict do not change)."""
    if not env.distributed:
        return net
    if sync_bn and not freeze_bn:
        if not env.device.startswith("cuda"):
            raise ConfigError("--sync-bn needs CUDA devices (torch's SyncBatchNorm does not run on "
                              "CPU/gloo); drop it or use --freeze-bn")
        _convert_sync_bn(net)
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [torch.device(env.device).index] if env.device.startswith("cuda") else None
    return DDP(net, device_ids=device_ids)


def _convert_sync_bn(net: nn.Module) -> None:
    """Replace BatchNorm children by SyncBatchNorm in place (``convert_sync_batchnorm`` returns a new
    root)."""
    for name, child in list(net.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
            setattr(net, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        else:
            _convert_sync_bn(child)


def all_reduce_sum(values: list[float], env: DistEnv | None = None) -> list[float]:
    """Sum a few float64 scalars over all ranks (identity for a single process)."""
    env = env or current_env()
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device if env.backend == "nccl" else "cpu")
    dist.all_reduce(t)
    return [float(v) for v in t.cpu()]


def any_rank(flag: bool, env: DistEnv | None = None) -> bool:
    """True on every rank when ``flag`` is true on at least one (a collective: every rank must call it)."""
    env = env or current_env()
    if not env.distributed:
        return bool(flag)
    return all_reduce_sum([1.0 if flag else 0.0], env)[0] > 0


def _group_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over every rank's copy (the global batch's mean under DDP; ``t.mean()`` for one process).
    Not differentiable across ranks: for detached statistics such as a fit target's scale. A collective."""
    if _group_size() == 1:
        return t.mean()
    s = torch.stack([t.detach().double().sum(), torch.tensor(float(t.numel()), dtype=torch.float64)])
    dist.all_reduce(s)
    return (s[0] / s[1]).to(t.dtype)


def gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` (same shape on each) concatenated along dim 0 in rank order; ``t`` for one process.
    Detached. A collective: under DDP, batch ``k`` of all ranks is batch ``k`` of one process with the global
    batch, so a statistic of the result (a quantile) equals the single-process one."""
    world = _group_size()
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.detach().contiguous())
    return torch.cat(parts)


def gather_objects(obj: Any, env: DistEnv | None = None) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable; ``[obj]`` for one process)."""
    env = env or current_env()
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def shard_dataset(n: int, env: DistEnv | None = None) -> torch.Tensor:
    """Indices of this rank's share of ``n`` samples for evaluation/analysis: strided, no padding and no
    duplicates, so sums all-reduced over ranks equal the single-process sums exactly once per sample."""
    env = env or current_env()
    return torch.arange(env.rank, n, env.world_size)


@contextmanager
def maybe_no_sync(net: nn.Module, skip_sync: bool) -> Iterator[None]:
    """DDP's ``no_sync()`` for gradient-accumulation micro-steps; a no-op for plain modules."""
    if skip_sync and hasattr(net, "no_sync"):
        with net.no_sync():
            yield
    else:
        yield
