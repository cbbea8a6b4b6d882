"""Running `camlabel train` under torchrun, and mixed precision: small helpers for training.py.

Data parallelism here means: every rank holds the same member, each *global* batch of
``batch_size`` images (drawn by the same class-balanced sampler on every rank) is split across
the ranks, and gradients are averaged after each backward pass. The result is single-process
training with the same global batch, up to floating-point reduction order, when the model draws
no random numbers (dropout 0, no augmentation): see ``docs/distributed.md``.

Gradients are all-reduced by hand (``average_gradients``) instead of through
DistributedDataParallel: training calls ``member.feature_map``, ``logits_from_pooled`` and the
CAM directly, and runs extra forward passes for the min-max localizer, none of which DDP's
forward hook sees; one flat all-reduce per step after ``backward`` is simple, exact, and
tolerates parameters that get no gradient on some ranks.

Every function is a no-op (or the single-process behaviour) when no process group with more
than one rank is initialised, so training.py calls them unconditionally.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Sampler, WeightedRandomSampler

log = logging.getLogger(__name__)

AMP_MODES = ("auto", "on", "off")
_RANK_SEED_STRIDE = 1_000_003  # ranks > 0 re-seed their global RNG at initial_seed + k * this


# ---------------------------------------------------------------- process group


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def local_rank() -> int:
    """LOCAL_RANK as torchrun sets it: the GPU index of this process on its machine."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def is_distributed() -> bool:
    """Whether a process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0, or a single process: the one that saves versions and prints."""
    return rank() == 0


def init_from_env(device: str = "auto") -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns whether it did.

    nccl with one GPU per process (cuda:LOCAL_RANK) when ``device`` is cuda, or auto with CUDA
    available; gloo on CPU.
    """
    if env_world_size() <= 1 or not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        if local_rank() >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local_rank()} but only {torch.cuda.device_count()} GPU(s): "
                "start at most one process per GPU (torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank()))
    else:
        dist.init_process_group("gloo")
    log.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- global batches


def check_batch_size(batch_size: int, world: int | None = None) -> None:
    world = world_size() if world is None else world
    if batch_size % world:
        raise ValueError(
            f"batch size {batch_size} is the global batch and must be divisible by the number "
            f"of processes ({world}): each takes batch_size / {world} images per step"
        )


def shard(batch: Sequence[int], rank: int, world: int) -> list[int]:
    """This rank's contiguous share of one global batch (equal shares when divisible)."""
    n = len(batch)
    return list(batch[n * rank // world : n * (rank + 1) // world])


class RankBatchSampler(Sampler[list[int]]):
    """Each global batch of ``batches`` (identical on every rank), cut down to this rank's share."""

    def __init__(self, batches: Iterable[list[int]], rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield shard(batch, self.rank, self.world)

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]


def shared_generator() -> torch.Generator:
    """A CPU generator holding rank 0's global RNG state, on every rank.

    The sampler draws from it, so all ranks draw the same global batches whatever else each
    rank draws (dropout masks, augmentations). Ranks > 0 then re-seed their global RNG, so those
    draws differ between ranks as they would between the images of one batch.
    """
    state = broadcast_object(torch.get_rng_state())
    generator = torch.Generator()
    generator.set_state(state)
    if rank() > 0:
        torch.manual_seed(torch.initial_seed() + _RANK_SEED_STRIDE * rank())
    return generator


def global_batch_loader(
    dataset: torch.utils.data.Dataset,
    weights: torch.Tensor,
    batch_size: int,
    drop_last: bool,
) -> DataLoader:
    """Class-balanced batches of ``batch_size`` (``weights``: per-sample draw weights).

    Single process: the plain loader (draws from the global RNG, as before). Distributed: every
    rank draws the same global batches from ``shared_generator()`` and loads its share; the
    loader's own per-epoch seed comes from the same generator, so the sequence of draws is the
    single-process one.
    """
    world = world_size()
    n = len(dataset)  # type: ignore[arg-type]
    if world == 1:
        sampler = WeightedRandomSampler(weights, num_samples=n, replacement=True)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last)
    check_batch_size(batch_size, world)
    if n < world:
        raise ValueError(f"{n} training image(s) cannot be shared by {world} processes")
    generator = shared_generator()
    sampler = WeightedRandomSampler(weights, n, replacement=True, generator=generator)
    batches = RankBatchSampler(BatchSampler(sampler, batch_size, drop_last), rank(), world)
    return DataLoader(dataset, batch_sampler=batches, generator=generator)


def mean_shares(counts: Sequence[int], device: torch.device) -> list[float]:
    """For losses that are means over ``counts[i]`` items of this rank's share of the batch: the
    factor world * local / global that turns each into this rank's part of the global mean,
    so that averaged gradients are those of the single-process mean over the global batch
    (exact even when ranks hold different numbers of labelled images). 1.0 single-process.
    """
    if not is_distributed():
        return [1.0] * len(counts)
    totals = torch.tensor(list(counts), dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    world = world_size()
    return [world * n / t if t > 0 else 0.0 for n, t in zip(counts, totals.tolist(), strict=True)]


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Sums of ``values`` over ranks (the values themselves single-process)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Replace each gradient by its mean over ranks (one flat all-reduce).

    A parameter without a gradient on some rank counts as zero there; one without a gradient
    on every rank keeps None (the optimizer then skips it, as single-process training would).
    """
    if not is_distributed():
        return
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    ref = params[0]
    flat = torch.cat(
        [
            *(p.grad.reshape(-1).to(ref.dtype) if p.grad is not None
              else torch.zeros(p.numel(), dtype=ref.dtype, device=ref.device) for p in params),
            torch.tensor([float(p.grad is not None) for p in params], dtype=ref.dtype,
                         device=ref.device),
        ]
    )  # fmt: skip
    dist.all_reduce(flat)
    grads, present = flat[: -len(params)], flat[-len(params) :].tolist()
    grads.div_(world_size())
    offset = 0
    for p, has in zip(params, present, strict=True):
        g = grads[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        if not has:
            p.grad = None
        elif p.grad is None:
            p.grad = g.to(p.dtype).clone()
        else:
            p.grad.copy_(g)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it (picklable objects; ``obj`` itself single-process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Overwrite every parameter and buffer with rank ``src``'s, in place."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=src)


# ---------------------------------------------------------------- synchronised BatchNorm


def _sync_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Batch norm over the global batch: statistics from every rank's share, differentiable.

    torch's SyncBatchNorm runs on GPUs only; this one is plain tensor ops and a differentiable
    all-reduce, so it runs on gloo/CPU and nccl/CUDA alike (two small all-reduces per layer).
    """
    from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

    bn._check_input_dim(x)
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    xf = x.float()
    count = xf.new_tensor([xf.numel() / max(xf.shape[1], 1)])
    sums = differentiable_all_reduce(torch.cat([xf.sum(dims), count]))
    n = sums[-1]
    mean = sums[:-1] / n
    centred = xf - mean.view(shape)
    var = differentiable_all_reduce((centred * centred).sum(dims)) / n
    out = centred * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        out = out * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)  # type: ignore[union-attr]
            m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            unbiased = var.detach() * n / (n - 1).clamp_min(1.0)
            bn.running_mean.mul_(1 - m).add_(mean.detach().to(bn.running_mean.dtype), alpha=m)
            bn.running_var.mul_(1 - m).add_(unbiased.to(bn.running_var.dtype), alpha=m)
    return out.to(x.dtype)


class _SyncBatchNormMixin:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and is_distributed():  # type: ignore[attr-defined]
            return _sync_batch_norm(self, x)  # type: ignore[arg-type]
        return super().forward(x)  # type: ignore[misc]


_SYNCED: dict[type, type] = {
    base: type(f"Synced{base.__name__}", (_SyncBatchNormMixin, base), {})
    for base in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
}


def sync_batchnorm(module: nn.Module, enabled: bool = True) -> Callable[[], None]:
    """Make ``module``'s BatchNorm layers normalise over the global batch while distributed;
    returns the function that turns them back into plain BatchNorm (call it after training).

    The layers keep their parameters, buffers and state-dict keys (only their class changes),
    so the optimizer and saved versions are unaffected. Needs every rank to run the same
    BatchNorm forward passes in the same order (not true of the min-max localizer's extra
    passes, which depend on each rank's images: training.py leaves BatchNorm per-rank there).
    """
    if not (enabled and is_distributed()):
        return lambda: None
    swapped = [(m, type(m)) for m in module.modules() if type(m) in _SYNCED]
    for m, cls in swapped:
        m.__class__ = _SYNCED[cls]

    def restore() -> None:
        for m, cls in swapped:
            m.__class__ = cls

    return restore


# ---------------------------------------------------------------- mixed precision


def amp_settings(
    mode: str | bool | None, device: torch.device | str, bf16: bool | None = None
) -> tuple[bool, torch.dtype]:
    """(enabled, dtype) of autocast for ``mode`` (auto | on | off) on ``device``.

    auto: on for CUDA, off elsewhere; on: CUDA only (a clear error on CPU). The dtype is
    bfloat16 where the GPU supports it (no loss scaling needed), else float16 (with a
    GradScaler). ``bf16`` overrides the capability check (tests without a GPU).
    """
    mode = {True: "on", False: "off", None: "auto"}.get(mode, mode)  # type: ignore[arg-type]
    if mode not in AMP_MODES:
        raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, not {mode!r}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    if mode == "on" and not cuda:
        raise ValueError(f"amp 'on' needs a CUDA device, not {device.type}: use auto or off")
    enabled = cuda and mode != "off"
    if not enabled:
        return False, torch.float32
    if bf16 is None:
        bf16 = torch.cuda.is_bf16_supported()
    return True, torch.bfloat16 if bf16 else torch.float16


def autocast(device: torch.device, enabled: bool, dtype: torch.dtype) -> Any:
    """torch.autocast when enabled; a null context otherwise (nothing changes on CPU)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def full_precision(device: torch.device) -> Any:
    """Suspend an active autocast (losses that autocast refuses, e.g. binary cross-entropy)."""
    if not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)
