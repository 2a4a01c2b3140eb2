"""Training and evaluation loops, device and process-group set-up, resumable runs."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import mpd_triton as mt
from models import build_model
from mpd_triton.attacks.methods import pgd
from mpd_triton.progress import progress
from plumbing.files import WriteError, write_text, write_with
from plumbing.provenance import provenance

from .checkpoint import (
    CheckpointError,
    checkpoint_bytes,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    verify_archive,
)
from .compiling import compile_for_batches, to_memory_format, use_channels_last
from .config import RunConfig
from .data import DatasetInfo, EpochLoader, ImageData
from .regularizers import replay_state, sr_penalty

__all__ = ["RunContext", "setup_context", "build_for", "train_run", "run_configs", "evaluate", "RunResult", "MODEL_FILE",
           "StoppedByMain", "planned_output_bytes", "RUN_FILES"]

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.previous.pt"  # the epoch before, with --keep-previous
MODEL_FILE = "model.pt"
METRICS = "metrics.jsonl"
RUN_FILES = (CHECKPOINT, PREVIOUS, MODEL_FILE)  # what --force removes before a run starts over
REPORT_BYTES = 4 << 20  # reports, plots and metrics of one run, generously
STARTUP_TIMEOUT = 300.0  # seconds the processes of a torchrun wait for each other at the start
# Config entries that may differ when a run is resumed (where it runs, not what it computes).
RESUMABLE_DIFFERENCES = {"out", "device", "download", "data_dir", "eval_attacks", "eval_limit", "eval_eps", "compile",
                         "channels_last", "force", "keep_previous", "dist_timeout", "quiet", "tensorboard"}
# What a setting missing from an older checkpoint's config was (options added since have these defaults).
DEFAULTS = RunConfig().to_dict()


class StoppedByMain(Exception):
    """On a rank other than 0: rank 0 failed in work that only it does, and says why itself."""


@dataclass
class RunContext:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def run_on_main(self, fn):
        """fn() on rank 0 only (writing files); every rank learns whether it failed, so the others stop
        at once and quietly (StoppedByMain) while rank 0 reports the error, instead of waiting for it."""
        error = None
        if self.is_main:
            try:
                fn()
            except Exception as e:
                error = e
        if self.distributed:
            failed = [error is not None]
            dist.broadcast_object_list(failed, src=0)
            if failed[0] and not self.is_main:
                raise StoppedByMain("rank 0 stopped the run")
        if error is not None:
            raise error


def setup_context(cfg: RunConfig) -> RunContext:
    """Device choice and, under torchrun (WORLD_SIZE > 1), the process group (nccl on GPU, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {cfg.device}: CUDA is not available on this machine")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        # A bounded wait in every collective (--dist-timeout): a rank that hangs stops the others with an
        # error instead of holding them forever; a rank that dies closes its connections, which ends
        # the others' waits at once. Meeting at the start allows longer: one process may take longer to
        # import and start than another.
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=max(cfg.dist_timeout, STARTUP_TIMEOUT)))
        _set_timeout(datetime.timedelta(seconds=cfg.dist_timeout))
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return RunContext(device, rank, world_size)


def _set_timeout(timeout: datetime.timedelta) -> None:
    """The default process group's timeout from now on (torch >= 2.12: dist.set_timeout; before: its
    private forerunner; where neither exists the start-up timeout stays)."""
    import torch.distributed.distributed_c10d as c10d

    setter = getattr(dist, "set_timeout", None) or getattr(c10d, "_set_pg_timeout", None)
    if setter is not None:
        setter(timeout)


def build_for(cfg: RunConfig, info: DatasetInfo) -> nn.Module:
    return build_model(cfg.model, in_channels=info.in_channels, num_classes=info.num_classes,
                       image_size=info.image_size, T=cfg.T, encoding=cfg.encoding,
                       neuron=cfg.neuron_options(), mean=info.mean, std=info.std, **cfg.model_options())


def _optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _scheduler(cfg: RunConfig, opt) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.schedule == "step":
        milestones = [max(1, int(cfg.epochs * 0.5)), max(1, int(cfg.epochs * 0.75))]
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def _all_reduce(values: list[float], ctx: RunContext) -> list[float]:
    if not ctx.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(model: nn.Module, reg: mt.MPDSGR, data: ImageData, cfg: RunConfig, ctx: RunContext,
             desc: str = "eval") -> dict:
    """Clean accuracy and mean Omega per layer over ``data`` (sharded over ranks, summed)."""
    was_training = model.training
    model.eval()
    loader = EpochLoader(data, cfg.eval_batch_size, shuffle=False, rank=ctx.rank, world_size=ctx.world_size,
                         device=ctx.device, pad=False)
    n_layers = len(reg.layers)
    sums = [0.0] * (2 + n_layers)  # correct, count, omega-sum per layer
    for x, y in progress(loader, f"[{desc}]", "batches", quiet=cfg.quiet or not ctx.is_main):
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = model(x)
        sums[0] += float((logits.argmax(1) == y).sum())
        sums[1] += len(y)
        for i, omega in enumerate(reg.layer_overlaps()):
            sums[2 + i] += float(omega.mean()) * len(y)
    sums = _all_reduce(sums, ctx)
    model.train(was_training)
    count = max(sums[1], 1.0)
    per_layer = [s / count for s in sums[2:]]
    return {"acc": sums[0] / count, "omega": sum(per_layer) / max(n_layers, 1), "omega_layers": per_layer}


# BatchNorm's running statistics start at mean 0, variance 1 and move by `momentum` (0.1) per step: after a
# few dozen steps they can still hold much of that start, and in eval mode a layer whose true variance is
# far below 1 then no longer reaches its threshold (silent layers, a model at chance; docs/training.md).
# While they hold more than this share of their start, they are recomputed after each epoch.
BN_STALE_SHARE = 0.01
BN_RECALIBRATION_IMAGES = 4096  # the first training images, in order, without augmentation


def batchnorm_is_stale(model: nn.Module, steps: int) -> bool:
    """Whether some BatchNorm's running statistics still hold more than BN_STALE_SHARE of their initial
    values after ``steps`` optimizer steps (a cumulative average, momentum None, never does)."""
    return any(m.momentum is not None and (1.0 - m.momentum) ** steps > BN_STALE_SHARE
               for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: ImageData, batch_size: int, device: torch.device) -> int:
    """Every BatchNorm's running statistics recomputed as the plain average over the first
    BN_RECALIBRATION_IMAGES training images (train mode, no gradient); returns the images used."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    was_training = model.training
    subset = data.limit(BN_RECALIBRATION_IMAGES)
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches below
        model.train()
        for start in range(0, len(subset), batch_size):
            model(subset.images[start:start + batch_size].to(device).float().div(255.0))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return len(subset)


@dataclass
class RunResult:
    name: str
    eta: float
    run_dir: Path
    history: list
    final: dict
    seconds_per_epoch: float


def run_configs(cfg: RunConfig) -> list[tuple[str, RunConfig]]:
    """(name, that run's own config) for each model a train.run trains: with --compare "plain"
    (eta 0) and "mpd" (the given eta) from the same seed, else the one run. A run's config holds
    its own eta (so a plain run's checkpoint says eta 0), and compare=False."""
    if cfg.compare:
        return [("plain", dataclasses.replace(cfg, eta=0.0, compare=False)),
                ("mpd", dataclasses.replace(cfg, compare=False))]
    return [("mpd" if cfg.eta > 0 else "plain", cfg)]


def _check_resumable(saved: dict, cfg: RunConfig, name: str, path: Path) -> None:
    old = dict(saved.get("config", {}))
    if "eta" in saved:  # a checkpoint of before each run had its own config: the run's eta was beside it
        old.update(eta=saved["eta"], compare=False)
    if saved.get("run") != name or old.get("eta") != cfg.eta:
        raise CheckpointError(f"{path} belongs to run {saved.get('run')!r} (eta={old.get('eta')}), "
                              f"not {name!r} (eta={cfg.eta})")
    new = cfg.to_dict()
    differing = sorted(k for k in new if k not in RESUMABLE_DIFFERENCES and old.get(k, DEFAULTS.get(k)) != new[k])
    if differing:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in differing[:4])
        raise CheckpointError(f"cannot resume {path}: the run was started with other settings ({details})")


@dataclass
class _Training:
    """What one run trains: the model, its MPD-SGR regularizer, the optimizer and the schedule."""

    model: nn.Module
    reg: mt.MPDSGR
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler


def _build_training(cfg: RunConfig, info: DatasetInfo, ctx: RunContext) -> _Training:
    torch.manual_seed(cfg.seed)
    model = to_memory_format(build_for(cfg, info).to(ctx.device), use_channels_last(cfg.channels_last, ctx.device))
    reg = mt.MPDSGR(model, eta=cfg.eta, options=cfg.mpd_options())
    opt = _optimizer(cfg, model)
    return _Training(model, reg, opt, _scheduler(cfg, opt))


def check_resumable_run(cfg: RunConfig, name: str, run_dir: Path, resume: bool, map_location="cpu") -> dict | None:
    """The run's checkpoint when it is to be continued (None when there is none: the run starts); raises
    CheckpointError (one line) when it may not be: a checkpoint without --resume (and without --force,
    which removes it), an unreadable one, or one made with other settings. train.run calls it for
    every run before it writes anything."""
    ckpt_path = run_dir / CHECKPOINT
    if not ckpt_path.is_file() or cfg.force:
        return None
    if not resume:
        raise CheckpointError(f"{ckpt_path} exists: pass --resume to continue that run, --force to start it over, "
                              "or choose another --out")
    try:
        saved = load_checkpoint(ckpt_path, map_location=map_location)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {_what_now(run_dir)}") from None
    _check_resumable(saved, cfg, name, ckpt_path)
    return saved


def _resume(cfg: RunConfig, name: str, run_dir: Path, training: _Training, ctx: RunContext,
            resume: bool) -> tuple[int, list]:
    """(first epoch to train, history so far): from the run's checkpoint with --resume, else (0, [])."""
    saved = check_resumable_run(cfg, name, run_dir, resume, ctx.device)
    if saved is None:
        return 0, []
    ckpt_path = run_dir / CHECKPOINT
    training.model.load_state_dict(saved["model"])
    training.opt.load_state_dict(saved["optimizer"])
    training.sched.load_state_dict(saved["scheduler"])
    set_rng_state(saved["rng"][min(ctx.rank, len(saved["rng"]) - 1)])
    if ctx.is_main and not cfg.quiet:
        print(f"[{name}] resuming after epoch {saved['epoch']}/{cfg.epochs} from {ckpt_path}")
    return saved["epoch"], saved["history"]


def _train_step(cfg: RunConfig, net: nn.Module, training: _Training, x: torch.Tensor, y: torch.Tensor,
                ctx: RunContext) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One optimizer step on (x, y) -> (task loss, logits, Omega of the step's forward)."""
    model, reg = training.model, training.reg
    if cfg.adv_train:
        # on the bare model: an attack forward under DDP would wait for a gradient sync
        x = pgd(model, x, y, eps=cfg.adv_eps, alpha=cfg.adv_step, steps=cfg.adv_steps)
    replay = None
    if cfg.sr_lambda > 0:  # (config refuses SR with bf16)
        x = x.detach().requires_grad_(True)
        replay = replay_state(ctx.device) if cfg.encoding == "poisson" else None  # the same spikes twice
    with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        logits = net(x)
    task = nn.functional.cross_entropy(logits.float(), y)
    loss = task + reg()
    omega = reg.mean_overlap()  # of this forward: SR's second forward replaces the records
    if cfg.sr_lambda > 0:
        loss = loss + cfg.sr_lambda * sr_penalty(net, x, logits, y, cfg.sr_h, rng_state=replay)
    training.opt.zero_grad(set_to_none=True)
    loss.backward()
    training.opt.step()
    return task, logits, omega


def _train_epoch(cfg: RunConfig, name: str, epoch: int, net: nn.Module, training: _Training,
                 loader: EpochLoader, ctx: RunContext) -> list[float]:
    """One epoch of training -> [loss * n, correct, n, omega * n], summed over the ranks."""
    loader.set_epoch(epoch)
    training.model.train()
    sums = [0.0, 0.0, 0.0, 0.0]
    bar = progress(loader, f"[{name}] epoch {epoch + 1}/{cfg.epochs}", "steps", scale=cfg.batch_size * ctx.world_size,
                   scale_unit="images", quiet=cfg.quiet or not ctx.is_main)  # a bar, or a line now and then in a log
    for x, y in bar:
        task, logits, omega = _train_step(cfg, net, training, x, y, ctx)
        n = len(y)
        sums[0] += float(task.detach()) * n
        sums[1] += float((logits.argmax(1) == y).sum())
        sums[2] += n
        sums[3] += omega * n
        bar.set_postfix(f"loss {sums[0] / sums[2]:.3f}, acc {100 * sums[1] / sums[2]:.1f}%, Omega {omega:.3f}")
    training.sched.step()
    if not all(math.isfinite(s) for s in sums):
        raise FloatingPointError(f"[{name}] training diverged in epoch {epoch + 1} (loss is not finite); "
                                 "lower --lr, --eta or --sr-lambda")
    return _all_reduce(sums, ctx)


def _checkpoint_epoch(cfg: RunConfig, name: str, run_dir: Path, epoch: int, training: _Training, history: list,
                      info: DatasetInfo, ctx: RunContext) -> None:
    """The epoch's checkpoint and metrics (rank 0); a checkpoint that cannot be written stops the run."""
    rngs = _gather_rng(ctx)
    record = history[-1]

    def save():
        state = {"run": name, "epoch": epoch + 1, "config": cfg.to_dict(), "model": training.model.state_dict(),
                 "optimizer": training.opt.state_dict(), "scheduler": training.sched.state_dict(), "rng": rngs,
                 "history": history, "model_spec": model_spec(cfg, info)}
        try:
            _save_epoch(run_dir, state, cfg.keep_previous)
        except WriteError as e:  # training on without a checkpoint would lose work silently
            raise e.with_hint(f"[{name}] stopped: epoch {epoch + 1} is lost, the last complete checkpoint "
                              f"(epoch {epoch}) is kept; make room, then continue with --resume" if epoch else
                              f"[{name}] stopped in its first epoch, before any checkpoint; make room, then "
                              "start again") from None
        _write_metrics(run_dir, history)
        if cfg.quiet:
            return
        print(f"[{name}] epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.4f}, "
              f"train acc {100 * record['train_acc']:.2f}%, test acc {100 * record['test_acc']:.2f}%, "
              f"Omega {record['test_omega']:.4f} ({record['epoch_seconds']:.1f} s)", flush=True)

    ctx.run_on_main(save)


def train_run(cfg: RunConfig, name: str, run_dir: Path, train: ImageData, test: ImageData,
              info: DatasetInfo, ctx: RunContext, resume: bool, compile_model: bool = False) -> RunResult:
    """Train one model (``cfg`` is the run's own config, ``run_configs``; eta = 0: plain) in
    ``run_dir``, resuming from its checkpoint if asked; with compile_model, full batches run under
    torch.compile (train/compiling.py)."""
    run_dir = Path(run_dir)
    training = _build_training(cfg, info, ctx)
    start_epoch, history = _resume(cfg, name, run_dir, training, ctx, resume)
    ctx.run_on_main(lambda: _write_metrics(run_dir, history))

    net = nn.parallel.DistributedDataParallel(training.model) if ctx.distributed else training.model
    net = compile_for_batches(net, cfg.batch_size, compile_model, retain_graph=cfg.sr_lambda > 0)
    loader = EpochLoader(train, cfg.batch_size, shuffle=True, augment=info.augment, seed=cfg.seed,
                         rank=ctx.rank, world_size=ctx.world_size, device=ctx.device)
    board = None
    if cfg.tensorboard and ctx.is_main:
        from .tensorboard import EpochLog

        board = EpochLog(run_dir)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        sums = _train_epoch(cfg, name, epoch, net, training, loader, ctx)
        train_seconds = time.perf_counter() - t0
        steps = (epoch + 1) * len(loader)
        stale = batchnorm_is_stale(training.model, steps)
        if stale:  # a short run: BatchNorm's running statistics still hold their start (see BN_STALE_SHARE)
            used = recalibrate_batchnorm(training.model, train, cfg.eval_batch_size, ctx.device)
            if ctx.is_main and not cfg.quiet:
                print(f"[{name}] after {steps} steps BatchNorm's running statistics still held more than "
                      f"{BN_STALE_SHARE:.0%} of their start: recomputed over {used} training images", flush=True)
        test_metrics = evaluate(training.model, training.reg, test, cfg, ctx, desc=f"{name} test")
        history.append({"epoch": epoch + 1, "lr": training.opt.param_groups[0]["lr"], "train_loss": sums[0] / sums[2],
                        "train_acc": sums[1] / sums[2], "train_omega": sums[3] / sums[2],
                        "test_acc": test_metrics["acc"], "test_omega": test_metrics["omega"],
                        "test_omega_layers": test_metrics["omega_layers"], "epoch_seconds": train_seconds,
                        **({"batchnorm_recalibrated": True} if stale else {})})
        _checkpoint_epoch(cfg, name, run_dir, epoch, training, history, info, ctx)
        if board is not None:
            board.add(history[-1])
    if board is not None:
        board.close()

    def save_model():
        try:
            save_checkpoint(run_dir / MODEL_FILE, {"run": name, "config": cfg.to_dict(),
                                                   "model": training.model.state_dict(),
                                                   "model_spec": model_spec(cfg, info),
                                                   "provenance": provenance(ctx.device)})
        except WriteError as e:
            raise e.with_hint(f"[{name}] the training is complete in {run_dir / CHECKPOINT}: make room, then "
                              "--resume writes it") from None

    ctx.run_on_main(save_model)
    seconds = [h["epoch_seconds"] for h in history]
    return RunResult(name, cfg.eta, run_dir, history, history[-1] if history else {},
                     sum(seconds) / max(len(seconds), 1))


def _write_metrics(run_dir: Path, history: list) -> None:
    """metrics.jsonl, one line per finished epoch, rewritten whole (atomically) after each epoch."""
    write_text(run_dir / METRICS, "".join(json.dumps(h) + "\n" for h in history))


def _save_epoch(run_dir: Path, state: dict, keep_previous: bool) -> None:
    """checkpoint.pt of this epoch; with keep_previous the one it replaces stays as checkpoint.previous.pt."""
    ckpt = run_dir / CHECKPOINT
    if keep_previous and ckpt.is_file():
        link = run_dir / (PREVIOUS + ".link.tmp")
        try:  # a second name for the current checkpoint, then renamed: checkpoint.pt exists all along
            if os.path.lexists(link):
                os.unlink(link)
            os.link(ckpt, link)
            os.replace(link, run_dir / PREVIOUS)
        except OSError:  # no hard links here (or the link failed): a copy, written as every file is
            if os.path.lexists(link):
                os.unlink(link)
            try:
                with open(ckpt, "rb") as source:
                    write_with(run_dir / PREVIOUS, lambda f: shutil.copyfileobj(source, f, 1 << 20))
            except OSError as e:  # reading the previous checkpoint failed (write_with raises WriteError itself)
                raise WriteError.from_os_error(run_dir / PREVIOUS, e) from None
    save_checkpoint(ckpt, state)


def _what_now(run_dir: Path) -> str:
    """What --resume can do when the run's checkpoint is unreadable."""
    previous = run_dir / PREVIOUS
    if previous.is_file():
        try:
            verify_archive(previous)
            return (f"the previous epoch's {previous} is intact: move it to {run_dir / CHECKPOINT} and --resume "
                    "again, or start over with --force")
        except CheckpointError:
            pass
    return ("start over with --force, or put a copy of an earlier checkpoint you keep in its place "
            "(--keep-previous keeps the previous epoch's)")


def planned_output_bytes(cfg: RunConfig, info: DatasetInfo, runs: int, run_dirs=()) -> int:
    """What a run of ``runs`` models writes at most: per model its checkpoint twice (the new one,
    written beside the previous one), three times with --keep-previous, model.pt and the reports;
    minus what the files in ``run_dirs`` (being replaced) already take."""
    with torch.device("meta"):  # shapes only: no memory
        model = build_for(cfg, info)
    ckpt = checkpoint_bytes(model, cfg.optimizer, cfg.momentum)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    per_run = ckpt * (3 if cfg.keep_previous else 2) + weights + REPORT_BYTES
    existing = sum((Path(d) / f).stat().st_size for d in run_dirs for f in RUN_FILES if (Path(d) / f).is_file())
    return max(0, runs * per_run - existing)


def _gather_rng(ctx: RunContext) -> list:
    """Every rank's RNG state (Poisson encoding and attacks draw from them)."""
    state = rng_state()
    if not ctx.distributed:
        return [state]
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, state)
    return gathered


def model_spec(cfg: RunConfig, info: DatasetInfo) -> dict:
    """What rebuilds the model from a checkpoint (used by train.eval)."""
    return {"model": cfg.model, "in_channels": info.in_channels, "num_classes": info.num_classes,
            "image_size": info.image_size, "T": cfg.T, "encoding": cfg.encoding, "neuron": cfg.neuron_options(),
            "mean": list(info.mean), "std": list(info.std), "data": cfg.data, **cfg.model_options()}
