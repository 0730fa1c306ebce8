"""Several processes per trial: data parallelism without the DDP wrapper (``train.world_size = N``).

Why no ``DistributedDataParallel``: MeanFlow's target differentiates the network
with ``torch.func.jvp`` (components/targets/meanflow.py), which does not run
through DDP's wrapper and its autograd hooks. So the loop calls
``loss.backward()`` as in one process and :func:`average_gradients` then
all-reduces the gradients explicitly (flattened into buckets, SUM then ÷ N).
Every rank's loss is the mean over its own B/N rows, so the average of the N
gradients is the gradient of the mean loss over the global batch of B (to
rounding). Exception by design: what a target computes *across* a batch (ESC's
plug-in velocity, IMM's particle groups) sees each rank's B/N rows only.

Launch (:func:`launch`): the calling process becomes rank 0 and N − 1 ranks
are spawned (``torch.multiprocessing``, start method "spawn"). They meet at a
``TCPStore`` that rank 0 opens on 127.0.0.1 (a free port picked by the OS);
backend nccl on CUDA (rank r on ``cuda:r``, e.g. the GPUs Ray gave the trial)
and gloo on CPU. Each rank draws its own data and noise (seeds offset by
:func:`seed_offset`); all start from rank 0's weights (:func:`broadcast_modules`);
rank 0 alone writes checkpoints, metrics, evaluations and sample grids.
"""
from __future__ import annotations

import hashlib
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

#: Collective timeout. Generous because the other ranks wait in the next
#: gradient all-reduce while rank 0 alone evaluates FID.
TIMEOUT = timedelta(minutes=60)
#: Gradients are reduced in flat buffers of at most this size (bounds the extra memory).
BUCKET_BYTES = 256 << 20
#: Rank r draws from seed + r·SEED_STRIDE: streams of neighbouring seeds (0..k in a study) never collide.
SEED_STRIDE = 1_000_003


# -- facts about this process ---------------------------------------------------------
def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size(cfg: DictConfig) -> int:
    """``train.world_size`` (1 when absent), validated."""
    ws = int(cfg.train.get("world_size", 1) or 1)
    if ws < 1:
        raise ValueError(f"train.world_size must be ≥ 1, got {ws}")
    return ws


def local_batch_size(batch_size: int, ws: int) -> int:
    """Rows per rank: ``train.batch_size`` is the global batch and must split evenly."""
    if batch_size % ws:
        raise ValueError(f"train.batch_size={batch_size} is not divisible by train.world_size={ws}: "
                         f"the global batch is split evenly over the ranks (use a multiple of {ws})")
    return batch_size // ws


def local_classes_per_batch(classes_per_batch: int, ws: int) -> int:
    """Same-class groups per rank (``train.classes_per_batch`` = k over the global batch).

    Each rank holds whole groups and draws its own k/N of them (as ESC's reference
    samples per GPU), so one optimiser step sees k groups; k must be a multiple of N.
    """
    k = int(classes_per_batch or 0)  # validated as an integer ≥ 0 by the loader
    if k % ws:
        raise ValueError(f"train.classes_per_batch={k} is not a multiple of train.world_size={ws}: each rank "
                         f"holds whole same-class groups (k/N each; use a multiple of {ws}, or 0 for i.i.d. batches)")
    return k // ws


def seed_offset(r: int | None = None) -> int:
    """Added to the data/noise seeds of rank r (0 for rank 0, so one process is unchanged)."""
    return (rank() if r is None else r) * SEED_STRIDE


def reseed(generators: list[torch.Generator], seed: int, step: int) -> None:
    """Fresh streams for ranks > 0 after a resume (a checkpoint holds rank 0's generator states only).

    A resumed multi-process run is therefore statistically, not bitwise, the
    same as an uninterrupted one; the streams depend only on (seed, rank, step).
    """
    for i, g in enumerate(generators):
        key = hashlib.sha256(f"{int(seed)}/{rank()}/{int(step)}/{i}".encode()).digest()
        g.manual_seed(int.from_bytes(key[:8], "little") >> 2)


# -- collectives used by the training loop ---------------------------------------------------
@torch.no_grad()
def average_gradients(params, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Replace every ``p.grad`` by its mean over the ranks (call on every rank after ``backward``).

    Gradients are copied into flat buffers (per device and dtype, at most
    ``bucket_bytes`` each), all-reduced with SUM, divided by the world size and
    copied back. A parameter without a gradient on a rank counts as a zero
    gradient there; one without a gradient on every rank keeps ``grad = None``
    (as in one process, so the optimizer skips it). The first buffer carries one
    presence flag per parameter for that, so a small model costs one collective.
    """
    ws = dist.get_world_size()
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    flags = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
    missing = not bool(flags.all())  # only then are the reduced flags read back (a host sync)
    present, first = None, 0  # present: reduced flags; first: index of the bucket's first parameter
    for b, bucket in enumerate(_buckets(params, bucket_bytes)):
        dev, dtype = bucket[0].device, bucket[0].dtype
        parts = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=dev, dtype=dtype)
                 for p in bucket]
        if b == 0:
            parts.insert(0, flags.to(device=dev, dtype=dtype))  # 0/1 sums stay exact in any float dtype
        flat = torch.cat(parts)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        if b == 0:
            present = (flat[:len(params)] > 0).tolist() if missing else None
            flat = flat[len(params):]
        flat.div_(ws)
        views = [v.view_as(p) for v, p in zip(flat.split([p.numel() for p in bucket]), bucket)]
        have = [i for i, p in enumerate(bucket) if p.grad is not None]
        if have:
            torch._foreach_copy_([bucket[i].grad for i in have], [views[i] for i in have])
        for i, p in enumerate(bucket):
            if p.grad is None and present[first + i]:  # a gradient on another rank only
                p.grad = views[i].clone()
        first += len(bucket)


def _buckets(params, bucket_bytes: int):
    """Consecutive runs of parameters on one device with one dtype, each ≤ bucket_bytes (≥ 1 parameter)."""
    bucket, size = [], 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if bucket and (p.device != bucket[0].device or p.dtype != bucket[0].dtype or size + nbytes > bucket_bytes):
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += nbytes
    if bucket:
        yield bucket


@torch.no_grad()
def all_mean_(tensors: list[torch.Tensor]) -> None:
    """In place: each tensor becomes its mean over the ranks (one collective; for logged scalars)."""
    flat = torch.stack([t.reshape(()).float() for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(dist.get_world_size())
    for t, v in zip(tensors, flat):
        t.copy_(v)


@torch.no_grad()
def broadcast_modules(*modules: torch.nn.Module) -> None:
    """Every rank gets rank 0's parameters and buffers (once, at the start)."""
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            dist.broadcast(t.data, src=0)


# -- launching the ranks ----------------------------------------------------------------------
def backend_for(cfg: DictConfig) -> str:
    """nccl when the trial trains on CUDA, else gloo; a pinned ``cuda:N`` cannot hold N ranks."""
    spec = str(cfg.train.device)
    if spec.startswith("cuda:"):
        raise ValueError(f"train.device={spec} pins one GPU, but train.world_size={world_size(cfg)} needs one GPU "
                         "per rank: use train.device=auto or cuda (rank r trains on cuda:r)")
    cuda = spec == "cuda" or (spec == "auto" and torch.cuda.is_available())
    if cuda and torch.cuda.device_count() < world_size(cfg):
        raise ValueError(f"train.world_size={world_size(cfg)} needs as many GPUs; "
                         f"{torch.cuda.device_count()} visible")
    return "nccl" if cuda else "gloo"


def launch(fn, cfg: DictConfig, **kwargs):
    """Run ``fn(cfg, **kwargs)`` on ``train.world_size`` ranks; returns rank 0's result.

    Rank 0 is this process (so a Ray trial's reporter keeps working); the
    others are spawned and run ``fn(cfg, progress=False, resume=...)`` without
    reporter or callbacks. An error on any rank ends every rank and is raised here.
    """
    import torch.multiprocessing as mp

    ws = world_size(cfg)
    local_batch_size(int(cfg.train.batch_size), ws)  # refuse before anything starts
    if isinstance(cfg.train.get("classes_per_batch"), int):  # null (the preset's choice): checked in setup
        local_classes_per_batch(cfg.train.classes_per_batch, ws)
    backend = backend_for(cfg)
    threads = torch.get_num_threads()
    per_rank = max(1, threads // ws)  # CPU ranks share the cores instead of oversubscribing them
    # the store's own bind takes every interface whatever host it is given: it gets a socket bound to loopback
    listener = socket.create_server(("127.0.0.1", 0))
    store = dist.TCPStore("127.0.0.1", listener.getsockname()[1], ws, is_master=True, wait_for_workers=False,
                          timeout=TIMEOUT, master_listen_fd=listener.detach())
    worker_kw = {"progress": False, **({"resume": kwargs["resume"]} if "resume" in kwargs else {})}
    ctx = mp.start_processes(_worker, args=(fn, OmegaConf.to_yaml(cfg), store.port, backend, ws, per_rank, worker_kw),
                             nprocs=ws - 1, join=False, start_method="spawn")
    ok = False
    try:
        _wait_ready(store, ctx, ws)
        if backend == "gloo":
            torch.set_num_threads(per_rank)
        else:
            torch.cuda.set_device(0)
        dist.init_process_group(backend, store=store, rank=0, world_size=ws, timeout=TIMEOUT)
        result = fn(cfg, **kwargs)
        ok = True
        return result
    except RuntimeError as exc:
        # a broken collective (gloo raises a plain RuntimeError) usually means another rank died first: its
        # error is the one to show. Rank 0's own errors (DivergenceError, ValueError, ...) are raised as they are.
        failed = _worker_error(ctx) if type(exc) is RuntimeError or isinstance(exc, dist.DistError) else None
        if failed is not None:
            raise RuntimeError(f"a training rank failed (spawned process i is rank i + 1):\n{failed}") from exc
        raise
    finally:
        if initialized():
            dist.destroy_process_group()
        torch.set_num_threads(threads)
        # after a success the other ranks are past their last collective and exit at once; join raises if one
        # failed. After a failure they may wait in a collective that will never complete: end them.
        if not (ok and _join_all(ctx, 120.0)):
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            for p in ctx.processes:
                p.join(10)


def _join_all(ctx, seconds: float) -> bool:
    """True once every spawned rank exited cleanly within ``seconds`` (join returns after each exit)."""
    deadline = time.monotonic() + seconds
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            return False
    return True


def _wait_ready(store, ctx, ws: int) -> None:
    """Wait until every spawned rank has imported and connected; raise at once if one died first."""
    deadline = time.monotonic() + TIMEOUT.total_seconds()
    keys = [f"ready/{r}" for r in range(1, ws)]
    while not store.check(keys):  # non-blocking, so a rank that dies while importing is noticed at once
        if any(not p.is_alive() for p in ctx.processes):
            raise RuntimeError(f"a training rank exited before it started:\n{_worker_error(ctx)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the training ranks did not start within {TIMEOUT}")
        time.sleep(0.05)


def _worker_error(ctx) -> str | None:
    """The first failed spawned rank's error (with its traceback), or None."""
    try:
        ctx.join(timeout=5)
    except Exception as exc:  # ProcessRaisedException / ProcessExitedException carry the message
        return str(exc)
    return None


def _worker(index: int, fn, cfg_yaml: str, port: int, backend: str, ws: int, threads: int, kwargs: dict) -> None:
    """Entry point of spawned rank ``index + 1``."""
    r = index + 1
    if backend == "nccl":
        torch.cuda.set_device(r)
    else:
        torch.set_num_threads(threads)
    store = dist.TCPStore("127.0.0.1", port, ws, is_master=False, timeout=TIMEOUT)
    cfg = OmegaConf.create(cfg_yaml)
    store.set(f"ready/{r}", "1")
    dist.init_process_group(backend, store=store, rank=r, world_size=ws, timeout=TIMEOUT)
    try:
        fn(cfg, **kwargs)
    finally:
        dist.destroy_process_group()

