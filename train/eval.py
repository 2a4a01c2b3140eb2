"""python -m train.eval: robustness of trained spiking models (see --help).

    python -m train.eval --checkpoint runs/quick-*/plain/model.pt --checkpoint runs/quick-*/mpd/model.pt \\
        --attacks fgsm,pgd,bim,apgd,noise,square --eps 2/255,4/255,8/255 --ensemble
    # the strongest set in one command: APGD with the five-gradient ensemble, ASSG + SA-PGD,
    # Square (and transfer with --source), with FGSM for the masking checks
    python -m train.eval --checkpoint runs/quick-*/mpd/model.pt --reliable --eps 8/255,16/255

Prints a table (clean and robust accuracy per attack and eps, the mean L1 norm
of the input gradient), writes eval.json / eval.md and robustness.png, and runs
the gradient-masking sanity checks (a failed check is flagged loudly).

eval.json is rewritten after every batch of images: an interrupted evaluation keeps
the models it finished and how far it got with the next; the same command with
``--resume`` (and the same --out) continues with the rest, to the same result.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from models import build_model  # noqa: E402
from mpd_triton.files import (WriteError, ensure_writable, optional_plot, remove_leftovers, save_figure,  # noqa: E402
                               write_json, write_text)
from mpd_triton.kernels.cpu import keep_freed_memory  # noqa: E402

from .attacks import ASSG_LEVEL, GRADIENT_ATTACKS, GRADIENT_SOURCES, SAPGD_STEPS  # noqa: E402
from .checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from .compiling import (COMPILE_MIN_STEPS, compile_for_batches, should_compile, to_memory_format,  # noqa: E402
                        use_channels_last)
from .config import ConfigError, fraction  # noqa: E402
from .data import DataError, load_dataset  # noqa: E402
from .robustness import EvalSettings, attack_steps, evaluate_robustness, parse_attacks  # noqa: E402

ENSEMBLE = ["own", "triangle", "sigmoid", "atan", "bptr"]
DEFAULT_ATTACKS = "fgsm,pgd,bim,gaussian"
# --reliable: the strongest set (FGSM only feeds the masking checks); + transfer when --source is given.
RELIABLE_ATTACKS = ["fgsm", "apgd", "assg", "square"]


def load_model(path: str | Path, device) -> tuple[torch.nn.Module, dict]:
    """Rebuild a model from a train.run checkpoint (model.pt or checkpoint.pt)."""
    state = load_checkpoint(Path(path), map_location=device)
    spec = state.get("model_spec")
    if spec is None or "model" not in state:
        raise CheckpointError(f"{path} has no model (expected a train.run model.pt or checkpoint.pt)")
    kwargs = {k: v for k, v in spec.items() if k not in ("model", "data")}
    model = build_model(spec["model"], **kwargs).to(device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit a {spec['model']} model: {str(e).splitlines()[0]}") from None
    model.eval()
    return model, spec


def _fmt(value) -> str:
    return f"{100 * value:.2f}%"


def result_table(names: list[str], results: list[dict]) -> str:
    """Plain-text table: rows = attack@eps, columns = models."""
    rows = [("clean", [_fmt(r["clean"]) for r in results])]
    for attack in results[0]["accuracy"]:
        for eps in results[0]["accuracy"][attack]:
            rows.append((f"{attack} @ {float(eps) * 255:.3g}/255", [_fmt(r["accuracy"][attack][eps]) for r in results]))
    for eps in results[0]["worst_case"]:
        rows.append((f"all attacks @ {float(eps) * 255:.3g}/255", [_fmt(r["worst_case"][eps]) for r in results]))
    if results[0].get("large_eps"):
        large = results[0]["large_eps"]
        for attack in large.get("by_attack", {"pgd": None}):
            rows.append((f"{attack} @ eps {large['eps']:g} (check)",
                         [_fmt(r["large_eps"].get("by_attack", {"pgd": r["large_eps"]["acc"]})[attack])
                          for r in results]))
    rows.append(("input-gradient L1", [f"{r['grad_l1']:.4g}" for r in results]))
    rows.append(("sanity checks", ["pass" if r["all_checks_passed"] else "FAILED" for r in results]))
    width = max(len(k) for k, _ in rows) + 2
    col = max(14, *(len(n) + 2 for n in names))
    lines = ["".ljust(width) + "".join(n.rjust(col) for n in names)]
    lines += [k.ljust(width) + "".join(v.rjust(col) for v in vals) for k, vals in rows]
    return "\n".join(lines)


def markdown(names: list[str], results: list[dict], command: str) -> str:
    md = ["# Robustness evaluation", "", f"Command: `{command}`", "", f"Images: {results[0]['n']}; settings: "
          + ", ".join(f"{k}={v}" for k, v in results[0]["settings"].items()), "",
          "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for line in result_table(names, results).splitlines()[1:]:
        key = line[: line.find("  ")].strip() if "  " in line else line
        cells = [c for c in line[len(key):].split() if c]
        md.append(f"| {key} | " + " | ".join(cells) + " |")
    for name, r in zip(names, results):
        if r["by_gradient"] and len(r["settings"]["gradients"]) > 1:
            md += ["", f"## {name}: accuracy per attacker gradient (the table above is the per-image worst case)", "",
                   "| attack @ eps | " + " | ".join(r["settings"]["gradients"]) + " |",
                   "|---|" + "---|" * len(r["settings"]["gradients"])]
            for attack, by_eps in r["by_gradient"].items():
                for eps, by_g in by_eps.items():
                    md.append(f"| {attack} @ {float(eps) * 255:.3g}/255 | "
                              + " | ".join(_fmt(by_g[g]) for g in r["settings"]["gradients"]) + " |")
        levels = r["settings"].get("assg_levels", [])
        if r.get("assg_by_level") and len(levels) > 1:
            keys = list(next(iter(r["assg_by_level"].values())))
            md += ["", f"## {name}: ASSG accuracy per level (the table above is the per-image worst case)", "",
                   "| eps | " + " | ".join(f"level {k}" for k in keys) + " |", "|---|" + "---|" * len(keys)]
            for eps, by_level in r["assg_by_level"].items():
                md.append(f"| {float(eps) * 255:.3g}/255 | " + " | ".join(_fmt(by_level[k]) for k in keys) + " |")
        md += ["", f"## {name}: gradient-masking sanity checks", ""]
        for c in r["checks"]:
            flag = "PASS" if c["passed"] else "**FAIL**"
            md.append(f"- {flag} `{c['name']}`: {c['detail']}")
        if not r["all_checks_passed"]:
            md.append("\n> **Warning: a sanity check failed: the robust accuracies above may come from gradient "
                      "masking, not robustness. Do not report them as robustness.**")
    md += ["", "![robust accuracy against eps](robustness.png)", ""]
    return "\n".join(md)


@optional_plot()
def plot(names: list[str], results: list[dict], path: Path) -> None:
    """Accuracy against eps: one panel for the per-image worst case over every attack, then one
    per attack; at most four panels a row."""
    panels = [("all attacks (worst case)", lambda r: r["worst_case"])]
    panels += [(attack, lambda r, a=attack: r["accuracy"][a]) for attack in results[0]["accuracy"]]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    for ax, (title, by_eps) in zip(axes.flat, panels):
        for name, r in zip(names, results):
            accuracy = by_eps(r)
            eps = sorted(accuracy, key=float)
            xs = [0.0] + [float(e) * 255 for e in eps]
            ys = [100 * r["clean"]] + [100 * accuracy[e] for e in eps]
            ax.plot(xs, ys, marker="o", label=name)
        ax.set_title(title)
        ax.set_xlabel("eps (x/255)")
        ax.set_ylabel("accuracy %")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(names), frameon=False)
    fig.tight_layout(rect=(0, 0.06 if rows == 1 else 0.03, 1, 1))
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def evaluation_passes(settings: EvalSettings, n_images: int) -> int:
    """About how many forward-backward passes of full batches one model's evaluation makes
    (what decides whether compiling it pays)."""
    def cost(attack: str) -> int:
        if attack in ("gaussian", "uniform"):
            return 1
        if attack == "square":
            return settings.n_queries // 3  # forward passes only
        steps = 1 if attack == "fgsm" else attack_steps(settings, attack)
        runs = len(settings.gradients) if attack in GRADIENT_ATTACKS else 1
        return steps * runs * (len(settings.assg_levels) if attack == "assg" else 1)

    per_batch = sum(cost(a) for a in settings.attacks) * len(settings.eps) * settings.eot
    return (n_images // settings.batch_size) * per_batch


def build_parser() -> argparse.ArgumentParser:
    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise ConfigError(f"{message} (see --help)")

    p = Parser(prog="python -m train.eval", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True,
                   help="model.pt or checkpoint.pt of train.run (repeat to compare models)")
    p.add_argument("--name", action="append", help="column name per checkpoint (default: the run folder name)")
    p.add_argument("--attacks", help=f"comma-separated: fgsm, pgd, bim, apgd, sapgd, assg, gaussian (noise), "
                                      f"uniform, square, transfer (default {DEFAULT_ATTACKS})")
    p.add_argument("--reliable", action="store_true",
                   help=f"the strongest set in one command: --attacks {','.join(RELIABLE_ATTACKS)} (+ transfer "
                        f"with --source) --ensemble")
    p.add_argument("--eps", default="2/255,4/255,8/255", help="comma-separated eps list (fractions allowed)")
    p.add_argument("--steps", type=int, default=7, help="PGD / BIM steps")
    p.add_argument("--step-size", type=fraction, default=0.01, help="PGD / BIM step size")
    p.add_argument("--apgd-steps", type=int, default=50)
    p.add_argument("--sapgd-steps", type=int, default=SAPGD_STEPS, help="SA-PGD and ASSG iterations")
    p.add_argument("--assg-level", default=f"{ASSG_LEVEL:g}",
                   help="ASSG level(s) in (0, 0.5), the paper's A/2, comma-separated: several run as an ensemble "
                        "(per-image worst case)")
    p.add_argument("--gradients",
                   help=f"attacker gradients, comma-separated: {', '.join(GRADIENT_SOURCES)} (default own)")
    p.add_argument("--ensemble", action="store_true",
                   help=f"shortcut for --gradients {','.join(ENSEMBLE)} (per-image worst case)")
    p.add_argument("--eot", type=int, help="gradient draws averaged per step (default 1; 8 for Poisson models)")
    p.add_argument("--queries", type=int, default=1000, help="Square attack query budget")
    p.add_argument("--source", help="checkpoint of an independently trained model for the transfer attack")
    p.add_argument("--no-large-eps-check", action="store_true", help="skip the eps = 1 sanity check")
    p.add_argument("--data", help="data set (default: the checkpoint's)")
    p.add_argument("--data-dir")
    p.add_argument("--limit", type=int, default=1000, help="test images (0: all)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="keep activations in torch.channels_last; default: on for the CPU, where it is faster")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="run the models under torch.compile (full batches); default: when the evaluation makes at "
                        f"least {COMPILE_MIN_STEPS} forward-backward passes per model, where compiling pays")
    p.add_argument("--out", help="output folder (default: eval-<time> beside the first checkpoint)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted evaluation in --out (the same command, plus --resume)")
    return p


def _previous(out: Path, key: dict, models: dict[str, str]) -> dict:
    """What an interrupted evaluation in ``out`` finished (--resume), if it was made with these settings
    (``key``) and the models of the same names came from the same checkpoints."""
    path = out / "eval.json"
    if not path.is_file():
        raise ConfigError(f"--resume: no {path} to continue")
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--resume: cannot read {path}: {e}") from None
    old = saved.get("key", {})
    if old != key:
        differing = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
        if "settings" in differing:
            differing.remove("settings")
            differing += [f"settings.{k}" for k in sorted(key["settings"])
                          if old.get("settings", {}).get(k) != key["settings"][k]]
        raise ConfigError(f"--resume: {path} was made with other settings ({', '.join(differing)}): give the same "
                          "options, or another --out")
    for name, r in saved.get("models", {}).items():
        if name in models and r["checkpoint"] != models[name]:
            raise ConfigError(f"--resume: {path} has model {name!r} from {r['checkpoint']}, not {models[name]}")
    return saved


def main(argv=None) -> int:
    where = {}
    try:
        return _evaluate(argv, where)
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: " + (f"what finished is in {where['out'] / 'eval.json'}; continue with the same command "
                                 f"with --out {where['out']} --resume" if "out" in where else "nothing was evaluated"),
              file=sys.stderr)
        return 130


def _evaluate(argv, where: dict) -> int:
    command = "python -m train.eval " + " ".join(sys.argv[1:] if argv is None else argv)
    keep_freed_memory()
    try:
        args = build_parser().parse_args(argv)
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
        if args.reliable and (args.attacks or args.gradients):
            raise ConfigError("--reliable sets the attacks and the gradients; drop --attacks / --gradients "
                              "(or drop --reliable)")
        if args.reliable:
            attacks = RELIABLE_ATTACKS + (["transfer"] if args.source else [])
        else:
            attacks = parse_attacks(args.attacks or DEFAULT_ATTACKS)
        try:
            eps = [fraction(e) for e in args.eps.split(",") if e.strip()]
        except argparse.ArgumentTypeError as e:
            raise ConfigError(f"--eps: {e}") from None
        try:
            assg_levels = [float(v) for v in args.assg_level.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--assg-level: expected numbers in (0, 0.5), got {args.assg_level!r}") from None
        if args.resume and not args.out:
            raise ConfigError("--resume needs --out, the folder of the evaluation to continue")
        gradients = (ENSEMBLE if args.ensemble or args.reliable else
                     [g.strip() for g in (args.gradients or "own").split(",") if g.strip()])
        if "transfer" in attacks and not args.source:
            raise ConfigError("the transfer attack needs --source CHECKPOINT (an independently trained model)")
        if args.name and len(args.name) != len(args.checkpoint):
            raise ConfigError("give one --name per --checkpoint")
        models = [load_model(c, device) for c in args.checkpoint]
        spec0 = models[0][1]
        for (_, spec), path in zip(models[1:], args.checkpoint[1:]):
            if spec["num_classes"] != spec0["num_classes"] or spec.get("data") != spec0.get("data"):
                raise ConfigError(f"{path} was trained on {spec.get('data')} ({spec['num_classes']} classes), "
                                  f"not {spec0.get('data')}: compare models of one data set")
        data_name = args.data or spec0.get("data")
        if args.data and args.data != spec0.get("data"):
            raise ConfigError(f"{args.checkpoint[0]} is a model for {spec0.get('data')}, not {args.data}")
        _, test, info = load_dataset(data_name, args.data_dir)
        if info.num_classes != spec0["num_classes"] or info.image_size != spec0["image_size"]:
            raise ConfigError(f"the checkpoint's model takes {spec0['image_size']}px images of "
                              f"{spec0['num_classes']} classes; {data_name} has {info.image_size}px, {info.num_classes}")
        source = None
        if args.source:
            source, source_spec = load_model(args.source, device)
            if source_spec["num_classes"] != spec0["num_classes"] or source_spec["in_channels"] != spec0["in_channels"]:
                raise ConfigError(f"--source {args.source} has {source_spec['num_classes']} classes and "
                                  f"{source_spec['in_channels']} input channels; the evaluated model has "
                                  f"{spec0['num_classes']} and {spec0['in_channels']}")
        poisson = any(spec["encoding"] == "poisson" for _, spec in models)
        settings = EvalSettings(attacks=attacks, eps=eps, steps=args.steps, alpha=args.step_size,
                                apgd_steps=args.apgd_steps, sapgd_steps=args.sapgd_steps,
                                assg_levels=assg_levels, gradients=gradients,
                                eot=args.eot or (8 if poisson else 1), n_queries=args.queries,
                                batch_size=args.batch_size, seed=args.seed,
                                large_eps_check=not args.no_large_eps_check)
        limit = None if args.limit == 0 else args.limit
        images = test.images[:limit].float().div(255.0)
        labels = test.labels[:limit]
        names = args.name or [Path(c).parent.name or Path(c).stem for c in args.checkpoint]
        if len(set(names)) < len(names):
            raise ConfigError(f"two models have the same name ({', '.join(names)}): give each a --name")
        out = Path(args.out) if args.out else (Path(args.checkpoint[0]).resolve().parent
                                               / f"eval-{time.strftime('%Y%m%d-%H%M%S')}")
        # what a resumed evaluation must share with the interrupted one
        key = json.loads(json.dumps({"settings": asdict(settings), "data": data_name, "n": len(images),
                                     "source": args.source}))
        checkpoints = {n: str(Path(c)) for n, c in zip(names, args.checkpoint)}
        previous = _previous(out, key, checkpoints) if args.resume else {}
        ensure_writable(out)  # before the evaluation starts (and not before the set-up: nothing left behind)
    except (ConfigError, CheckpointError, DataError, ValueError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"mpd-triton train.eval: {len(images)} {data_name} test images, device {device}, attacks {attacks}, "
          f"eps {[round(e * 255, 3) for e in eps]}/255, gradients {gradients}, eot {settings.eot}", flush=True)
    where["out"] = out
    if args.resume:
        for path in remove_leftovers(out):
            print(f"removed {path} (a temporary file left by an interrupted write)", flush=True)
    compile_models, why = should_compile(args.compile, evaluation_passes(settings, len(images)))
    print(f"torch.compile: {'on' if compile_models else 'off'} ({why})", flush=True)
    results = []

    def save(in_progress: dict | None = None):  # after every batch: an interrupted evaluation keeps what it did
        write_json(out / "eval.json", {"command": command, "key": key, "models": dict(zip(names, results)),
                                       **({"in_progress": in_progress} if in_progress else {})})

    unfinished = previous.get("in_progress", {})
    for name, (model, spec), path in zip(names, models, args.checkpoint):
        if name in previous.get("models", {}):
            results.append(previous["models"][name])
            print(f"[{name}] evaluated before: kept from {out / 'eval.json'}", flush=True)
            continue
        state = unfinished.get("state") if unfinished.get("model") == name and \
            unfinished.get("checkpoint") == checkpoints[name] else None
        if state:
            print(f"[{name}] continuing after image {min(state['next'], len(images))} of {len(images)}", flush=True)
        t0 = time.perf_counter()
        model = to_memory_format(model, use_channels_last(args.channels_last, device))
        model = compile_for_batches(model, settings.batch_size, compile_models)
        r = evaluate_robustness(model, images, labels, settings, source=source, num_classes=spec["num_classes"],
                                desc=name, resume_state=state,
                                on_batch=lambda state, name=name: save({"model": name, "checkpoint": checkpoints[name],
                                                                      "state": state}))
        r["seconds"] = time.perf_counter() - t0  # this session's share when it was resumed
        r["checkpoint"] = str(Path(path))
        results.append(r)
        save()
    write_text(out / "eval.md", markdown(names, results, command))
    plot(names, results, out / "robustness.png")
    print("\n" + result_table(names, results))
    for name, r in zip(names, results):
        for c in r["checks"]:
            if not c["passed"]:
                print(f"\n!!! {name}: sanity check {c['name']} FAILED: {c['detail']}\n!!! the robust accuracies "
                      "may reflect gradient masking, not robustness", file=sys.stderr)
    print(f"\nwrote {out}/eval.json, eval.md, robustness.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
