"""python -m train.run: train spiking networks with MPD-SGR (see --help).

With no arguments it runs the 'quick' preset: a small SNN on the bundled
Fashion-MNIST subset, trained plain (eta = 0) and with MPD-SGR from the same
seed, then compared side by side.

Faults end in one line on stderr and a non-zero exit (docs/training.md, "Interrupted runs and faults"):
a file that cannot be written (WriteError: the file and the cause; the previous
complete file is kept), an unreadable checkpoint, SIGTERM or Ctrl-C (the last
finished epoch is in the checkpoint), running out of memory, and under torchrun a
rank that died or hangs (the others stop, naming their rank and the cause).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mpd_triton.attacks.evaluation import (
    EvalSettings,
    evaluate_robustness,
    parse_attacks,
)
from plumbing.files import WriteError, ensure_writable, remove_leftovers, write_json
from plumbing.lock import LOCK_NAME, FolderBusy, folder_lock
from plumbing.memory import keep_freed_memory

from .checkpoint import CheckpointError
from .compiling import should_compile, to_memory_format, use_channels_last
from .config import PRESET_NOTES, ConfigError, RunConfig, eps_label, parse_args
from .data import DataError, ImageData, dataset_info, load_dataset
from .diagnostics import diagnose, layer_diagnostics
from .engine import (
    RUN_FILES,
    RunContext,
    StoppedByMain,
    build_for,
    check_resumable_run,
    planned_output_bytes,
    run_configs,
    setup_context,
    train_run,
)
from .report import membrane_samples, write_comparison, write_run_report

RUNS_ROOT = Path("runs")
DIAGNOSTIC_IMAGES = 1000  # test images of the per-layer diagnostics in the reports


def _resolve_out(cfg: RunConfig, resume: bool, ctx: RunContext) -> Path:
    if cfg.out:
        out = Path(cfg.out)
        if resume and not any(out.glob("*/checkpoint.pt")):
            raise CheckpointError(f"--resume: no checkpoint under {out}; start the run without --resume")
        return out
    if resume:
        candidates = sorted(p for p in RUNS_ROOT.glob(f"{cfg.preset}-*") if any(p.glob("*/checkpoint.pt")))
        if not candidates:
            raise CheckpointError(f"--resume: no run of preset {cfg.preset!r} under {RUNS_ROOT}/ (give --out)")
        return candidates[-1]
    name = [f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"]
    if ctx.distributed:  # every rank uses rank 0's clock
        dist.broadcast_object_list(name, src=0)
    return RUNS_ROOT / name[0]


def _prepare_out(cfg: RunConfig, out: Path, run_names: list[str]) -> None:
    """Before the data are loaded (rank 0): the temporary files of a killed write removed, with --force
    the runs' old checkpoints and models, and the folder checked for writing and for room for the run."""
    run_dirs = [out / name for name in run_names]
    for folder in [out, *run_dirs]:
        for path in remove_leftovers(folder):
            print(f"removed {path} (a temporary file left by an interrupted write)", flush=True)
    if cfg.force:
        for path in (d / f for d in run_dirs for f in RUN_FILES):
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                raise WriteError.from_os_error(path, e).with_hint("--force cannot start the run over") from None
    try:
        need = planned_output_bytes(cfg, dataset_info(cfg.data), len(run_names), run_dirs)
    except ValueError:  # a model that does not fit the images: said once the data are loaded
        need = 0
    ensure_writable(out, need, what=f"the run ({len(run_names)} model(s): checkpoints, model.pt, reports)")


def robustness_summary(model, test: ImageData, cfg: RunConfig, num_classes: int, name: str) -> dict | None:
    """The end-of-training evaluation: cfg.eval_attacks at cfg.eval_eps on cfg.eval_limit test images."""
    attacks = parse_attacks(cfg.eval_attacks)
    if not attacks:
        return None
    subset = test.limit(cfg.eval_limit)
    settings = EvalSettings(attacks=attacks, eps=[cfg.eval_eps], eot=8 if cfg.encoding == "poisson" else 1,
                            batch_size=cfg.eval_batch_size, seed=cfg.seed)
    r = evaluate_robustness(model, subset.images.float().div(255.0), subset.labels, settings,
                            num_classes=num_classes, desc=f"{name} attacks")
    key = next(iter(r["worst_case"]))
    accuracy = {"clean": r["clean"], **{a: r["accuracy"][a][key] for a in attacks}, "all attacks": r["worst_case"][key]}
    return {"eps": cfg.eval_eps, "n": r["n"], "accuracy": accuracy, "grad_l1": r["grad_l1"],
            "checks_passed": r["all_checks_passed"], "checks": r["checks"], "large_eps": r["large_eps"]}


def run(cfg: RunConfig, resume: bool) -> list[dict]:
    ctx = setup_context(cfg)
    out = _resolve_out(cfg, resume, ctx)
    runs = run_configs(cfg)
    with contextlib.ExitStack() as held:
        def claim():  # one train.run per folder (the ranks of one torchrun share it: rank 0 holds the lock)
            try:
                held.enter_context(folder_lock(out, "train.run"))
            except OSError as e:  # the folder (or its lock file) cannot be made: said of what failed
                raise WriteError.from_os_error(Path(e.filename) if e.filename else out / LOCK_NAME, e) from None
            for name, run_cfg in runs:  # refused before anything is written (config.json included)
                check_resumable_run(run_cfg, name, out / name, resume)

        ctx.run_on_main(claim)
        return _run(cfg, resume, ctx, out, runs)


def _run(cfg: RunConfig, resume: bool, ctx: RunContext, out: Path, runs: list) -> list[dict]:
    ctx.run_on_main(lambda: _prepare_out(cfg, out, [name for name, _ in runs]))
    train, test, info = load_dataset(cfg.data, cfg.data_dir, cfg.download)
    train, test = train.limit(cfg.train_limit), test.limit(cfg.test_limit)
    try:
        build_for(cfg, info)
    except ValueError as e:
        raise ConfigError(f"model {cfg.model} on {cfg.data} ({info.image_size}x{info.image_size}): {e}") from None
    ctx.run_on_main(lambda: write_json(out / "config.json", cfg.to_dict()))
    if ctx.is_main and not cfg.quiet:
        print(f"mpd-triton train.run: preset {cfg.preset}, model {cfg.model}, data {cfg.data} "
              f"({len(train)} train / {len(test)} test, from {info.source}), device {ctx.device}"
              f"{f' x {ctx.world_size} processes' if ctx.distributed else ''}, out {out}", flush=True)
    full_steps = cfg.epochs * (len(train) // (cfg.batch_size * ctx.world_size)) * len(runs)
    compile_model, why = should_compile(cfg.compile, full_steps)
    if ctx.is_main and not cfg.quiet:
        print(f"torch.compile: {'on' if compile_model else 'off'} ({why})", flush=True)
    results = [train_run(run_cfg, name, out / name, train, test, info, ctx, resume, compile_model)
               for name, run_cfg in runs]
    if ctx.distributed:  # what follows is rank 0's alone: no other rank waits for it in a collective
        ctx.barrier()  # every rank is past its last collective before any of them shuts its connections
        dist.destroy_process_group()
    if not ctx.is_main:
        return []
    reports, samples = [], {}
    probe = test.images[:256].float().div(255.0).to(ctx.device)
    diagnosed = test.limit(DIAGNOSTIC_IMAGES).images.float().div(255.0).to(ctx.device)
    for (name, run_cfg), result in zip(runs, results):
        model = to_memory_format(build_for(cfg, info).to(ctx.device), use_channels_last(cfg.channels_last, ctx.device))
        model.load_state_dict(torch.load(out / name / "model.pt", map_location=ctx.device, weights_only=False)["model"])
        samples[name] = membrane_samples(model, probe, seed=cfg.seed)
        diagnostics = layer_diagnostics(model, diagnosed, cfg.eval_batch_size, cfg.mpd_options())
        problems = diagnose(result.final["test_acc"], info.num_classes, diagnostics, len(test))
        if problems:  # said before any robustness figure: those of such a model mean nothing
            print(f"[{name}] {'; '.join(problems)}: robustness cannot be judged on this model (train longer: more "
                  "epochs or images)", flush=True)
        robustness = robustness_summary(model, test, cfg, info.num_classes, name)
        if robustness and not cfg.quiet:
            failed = [c["name"] for c in robustness["checks"] if not c["passed"]]
            verdict = ("not judged (see above)" if problems else "pass" if not failed else
                       f"FAILED: {', '.join(failed)} (report.md says why; the robust accuracies may reflect "
                       "gradient masking)")
            print(f"[{name}] " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in robustness["accuracy"].items())
                  + f" (eps {eps_label(cfg.eval_eps)}, {robustness['n']} images); sanity checks {verdict}", flush=True)
        reports.append(write_run_report(out / name, name, run_cfg.to_dict(), result.history, samples[name],
                                        robustness, diagnostics, len(test), problems))
        if cfg.tensorboard:
            from .tensorboard import log_final

            log_final(out / name, len(result.history), robustness, diagnostics)
    if len(reports) > 1:
        note = PRESET_NOTES.get(cfg.preset)
        table = write_comparison(out, reports, samples, note)
        print("\n" + table + (f"\n\n{note}" if note else "") + f"\n\nreports: {out / 'comparison.md'}, "
              + ", ".join(str(out / r["run"] / "report.md") for r in reports))
    else:
        r = reports[0]
        print(f"\n{r['run']}: clean accuracy {100 * r['clean_acc']:.2f}%, mean Omega {r['mean_omega']:.4f}; "
              f"report: {out / r['run'] / 'report.md'}")
    return reports


class Terminated(BaseException):
    """SIGTERM, as an exception: files being written are cleaned up on the way out (torchrun sends it
    to the other processes when one fails)."""


def _raise_terminated(signum, frame):
    raise Terminated()


# What a failed collective says (gloo, nccl, the TCP store): a peer died, or hangs past --dist-timeout.
_PEER_FAILURE = re.compile(r"gloo|nccl|connection (reset|closed|refused)|timed out|broken pipe|TCPStore|ProcessGroup",
                           re.IGNORECASE)


def _peer_failure(error: BaseException) -> str | None:
    """The cause, in a few words, when ``error`` is a collective's failure in a multi-process run."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    is_dist_error = isinstance(error, getattr(dist, "DistError", ()))
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if not (is_dist_error or _PEER_FAILURE.search(text)):
        return None
    text = re.sub(r"^(\[[^\]]*\]\s*)+", "", text)  # gloo's "[/path/pair.cc:534] " prefix
    return text.split(". ")[0].rstrip(".")[:200]


def main(argv=None) -> int:
    keep_freed_memory()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = f"rank {os.environ.get('RANK', '0')}: " if world_size > 1 else ""
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated) if on_main_thread else None
    resume_hint = "the last finished epoch is in the run's checkpoint; continue with --resume"
    leave_now = None  # an exit status to leave with at once, without the interpreter's own exit
    try:
        cfg, resume = parse_args(argv)
        run(cfg, resume)
        if world_size > 1 and os.environ.get("RANK", "0") != "0":
            # A rank other than 0 has finished (its group torn down, it writes no files). In two CI runs a
            # finished rank 1 ended in std::terminate (SIGABRT) during its teardown, in destroy_process_group
            # or in the interpreter's exit (not known which): the barrier before destroy_process_group keeps
            # any rank from shutting its connections while another is still in a collective, and leaving
            # at once skips the interpreter's exit and its C++ destructors (gloo, the DDP reducer).
            leave_now = 0
    except StoppedByMain:
        return 2  # rank 0 says why
    except (ConfigError, DataError, CheckpointError, FloatingPointError, WriteError, FolderBusy) as e:
        print(f"error: {rank}{e}", file=sys.stderr)
        return 2
    except (torch.OutOfMemoryError, MemoryError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {rank}out of memory ({first[:160]}); lower --batch-size or --eval-batch-size; "
              f"{resume_hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {rank}{resume_hint}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"stopped by SIGTERM: {rank}{resume_hint}", file=sys.stderr)
        return 143
    except (RuntimeError, OSError) as e:
        cause = _peer_failure(e)
        if cause is None:
            raise
        print(f"error: {rank}lost contact with the other processes ({cause}): one of them died or hangs, see "
              f"its message; {resume_hint}", file=sys.stderr)
        # The process group is broken: tearing it down (destroy_process_group, or the interpreter's own
        # exit) can join a gloo or TCP-store thread that will never finish and end in std::terminate,
        # SIGABRT after the one line above (seen in CI, about one run in ten). The files are already
        # closed and the checkpoint is whole: leave without running the C++ destructors.
        leave_now = 2
        return 2
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)
        if leave_now is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(leave_now)
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # else a broken process group aborts the process on exit
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
