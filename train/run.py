"""python -m train.run: train spiking networks with MPD-SGR (see --help).

With no arguments it runs the 'quick' preset: a small SNN on the bundled
Fashion-MNIST subset, trained plain (eta = 0) and with MPD-SGR from the same
seed, then compared side by side.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mpd_triton.kernels.cpu import keep_freed_memory

from .checkpoint import CheckpointError
from .compiling import should_compile, to_memory_format, use_channels_last
from .config import ConfigError, RunConfig, parse_args
from .data import DataError, ImageData, load_dataset
from .engine import RunContext, build_for, setup_context, train_run
from .report import membrane_samples, write_comparison, write_run_report
from .robustness import EvalSettings, evaluate_robustness, parse_attacks

RUNS_ROOT = Path("runs")


def _resolve_out(cfg: RunConfig, resume: bool, ctx: RunContext) -> Path:
    if cfg.out:
        out = Path(cfg.out)
        if resume and not any(out.glob("*/checkpoint.pt")):
            raise CheckpointError(f"--resume: no checkpoint under {out}")
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
    train, test, info = load_dataset(cfg.data, cfg.data_dir, cfg.download)
    train, test = train.limit(cfg.train_limit), test.limit(cfg.test_limit)
    try:
        build_for(cfg, info)
    except ValueError as e:
        raise ConfigError(f"model {cfg.model} on {cfg.data} ({info.image_size}x{info.image_size}): {e}") from None
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        print(f"mpd-triton train.run: preset {cfg.preset}, model {cfg.model}, data {cfg.data} "
              f"({len(train)} train / {len(test)} test, from {info.source}), device {ctx.device}"
              f"{f' x {ctx.world_size} processes' if ctx.distributed else ''}, out {out}", flush=True)
    runs = [("plain", 0.0), ("mpd", cfg.eta)] if cfg.compare else [("mpd" if cfg.eta > 0 else "plain", cfg.eta)]
    full_steps = cfg.epochs * (len(train) // (cfg.batch_size * ctx.world_size)) * len(runs)
    compile_model, why = should_compile(cfg.compile, full_steps)
    if ctx.is_main:
        print(f"torch.compile: {'on' if compile_model else 'off'} ({why})", flush=True)
    reports, samples = [], {}
    probe = test.images[:256].float().div(255.0).to(ctx.device)
    for name, eta in runs:
        result = train_run(cfg, name, eta, out / name, train, test, info, ctx, resume, compile_model)
        if not ctx.is_main:
            continue
        model = to_memory_format(build_for(cfg, info).to(ctx.device), use_channels_last(cfg.channels_last, ctx.device))
        model.load_state_dict(torch.load(out / name / "model.pt", map_location=ctx.device, weights_only=False)["model"])
        samples[name] = membrane_samples(model, probe, seed=cfg.seed)
        robustness = robustness_summary(model, test, cfg, info.num_classes, name)
        if robustness:
            print(f"[{name}] " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in robustness["accuracy"].items())
                  + f" (eps {cfg.eval_eps * 255:.3g}/255, {robustness['n']} images); sanity checks "
                  + ("pass" if robustness["checks_passed"] else "FAILED"), flush=True)
        reports.append(write_run_report(out / name, name, eta, cfg.to_dict(), result.history, samples[name],
                                        robustness))
    if ctx.is_main:
        if len(reports) > 1:
            table = write_comparison(out, reports, samples)
            print("\n" + table + f"\n\nreports: {out}/comparison.md, {out}/<run>/report.md")
        else:
            r = reports[0]
            print(f"\n{r['run']}: clean accuracy {100 * r['clean_acc']:.2f}%, mean Omega {r['mean_omega']:.4f}; "
                  f"report: {out / r['run'] / 'report.md'}")
    if ctx.distributed:
        dist.destroy_process_group()
    return reports


def main(argv=None) -> int:
    keep_freed_memory()
    try:
        cfg, resume = parse_args(argv)
        run(cfg, resume)
    except (ConfigError, DataError, CheckpointError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last finished epoch is in the run's checkpoint; continue with --resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
