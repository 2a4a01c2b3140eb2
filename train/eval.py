"""python -m train.eval: robustness of trained spiking models (see --help).

    python -m train.eval --checkpoint runs/quick-*/plain/model.pt --checkpoint runs/quick-*/mpd/model.pt \\
        --attacks fgsm,pgd,bim,apgd,gaussian,square --eps 2/255,4/255,8/255 --ensemble
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
import contextlib
import json
import re
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch

from models import build_model
from mpd_triton.attacks import (
    DEFAULT_ATTACKS,
    ENSEMBLE,
    RELIABLE_ASSG_LEVELS,
    RELIABLE_ATTACKS,
    RESULTS_VERSION,
    EvalSettings,
    attack_steps,
    evaluate_robustness,
    parse_attacks,
)
from mpd_triton.attacks.methods import (
    APGDT_TARGETS,
    ASSG_LEVEL,
    FITTED_WIDTH,
    GRADIENT_ATTACKS,
    GRADIENT_SOURCES,
    RESTART_ATTACKS,
    SAPGD_STEPS,
    TRANSFER_ATTACKS,
)
from plumbing.files import (
    WriteError,
    ensure_writable,
    remove_leftovers,
    write_json,
    write_text,
)
from plumbing.lock import LOCK_NAME, FolderBusy, folder_lock
from plumbing.memory import keep_freed_memory
from plumbing.provenance import provenance

from .checkpoint import CheckpointError, load_checkpoint
from .compiling import (
    COMPILE_MIN_STEPS,
    compile_for_batches,
    should_compile,
    to_memory_format,
    use_channels_last,
)
from .config import ConfigError, check_device, eps_label, fraction, states_default
from .data import DataError, load_dataset
from .diagnostics import diagnose, layer_diagnostics
from .report import (
    eval_markdown,
    eval_table,
    membrane_samples,
    plot_membrane,
    plot_robustness,
)
from .results import IN_PROGRESS

MEMBRANE_IMAGES, DIAGNOSTIC_IMAGES = 256, 1000  # test images of membrane.png and of the per-layer diagnostics
# EvalSettings' fields added after results version 3 was fixed, with the value that evaluates as an
# eval.json without them did: --resume continues such a file.
SETTINGS_ADDED = {"restarts": 1}


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


def evaluation_passes(settings: EvalSettings, n_images: int) -> int:
    """About how many forward-backward passes of full batches one model's evaluation makes
    (what decides whether compiling it pays)."""
    def cost(attack: str) -> int:
        if attack in ("gaussian", "uniform", "transfer"):  # transfer: the source's passes are not the model's
            return 1
        if attack == "square":
            return settings.n_queries // 3  # forward passes only
        steps = 1 if attack == "fgsm" else attack_steps(settings, attack)
        runs = len(settings.gradients) if attack in GRADIENT_ATTACKS else 1
        runs *= len(settings.assg_levels) if attack == "assg" else 1
        runs *= settings.restarts if attack in RESTART_ATTACKS else 1  # at most: later runs take the unfooled
        runs *= APGDT_TARGETS if attack == "apgd-t" else 1  # at most (fewer classes, or images fooled before)
        return steps * runs

    per_batch = sum(cost(a) for a in settings.attacks) * len(settings.eps) * settings.eot
    return (n_images // settings.batch_size) * per_batch  # a partial batch runs eagerly (compile_for_batches)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (its example commands), and each option's default after its help,
    where the help does not say it already (None and False, "not given", are not shown)."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = not (action.default is None or action.default is False or action.default == argparse.SUPPRESS)
        if action.option_strings and shown and not states_default(text):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise ConfigError(f"{message} (see --help)")

    p = Parser(prog="python -m train.eval", description=__doc__,
               formatter_class=_HelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True,
                   help="model.pt or checkpoint.pt of train.run (repeat to compare models)")
    p.add_argument("--name", action="append", help="column name per checkpoint (default: the run folder name)")
    p.add_argument("--attacks", help=f"comma-separated: fgsm, pgd, bim, apgd, apgd-t (targeted APGD on the DLR "
                                      f"loss, --apgd-steps iterations per target among the {APGDT_TARGETS} most "
                                      f"likely other classes), sapgd, assg, gaussian (Gaussian noise), uniform "
                                      f"(uniform noise), square, transfer (default {','.join(DEFAULT_ATTACKS)}, as "
                                      "train.run's end-of-run evaluation)")
    p.add_argument("--reliable", action="store_true",
                   help=f"the strongest set in one command: --attacks {','.join(RELIABLE_ATTACKS)} (+ transfer "
                        f"with --source) --ensemble")
    p.add_argument("--eps", default="2/255,4/255,8/255", help="comma-separated eps list (fractions allowed)")
    p.add_argument("--steps", type=int, default=7, help="PGD / BIM steps")
    p.add_argument("--step-size", type=fraction, default=0.01, help="PGD / BIM step size")
    p.add_argument("--apgd-steps", type=int, default=50, help="APGD iterations")
    p.add_argument("--sapgd-steps", type=int, default=SAPGD_STEPS, help="SA-PGD and ASSG iterations")
    p.add_argument("--restarts", type=int, default=1,
                   help="runs of SA-PGD and ASSG + SA-PGD per image, each further one from a new random start in "
                        "the eps ball (seeded by --seed) on the images no earlier run fooled; an image fooled by "
                        "any run counts as fooled")
    p.add_argument("--assg-level",
                   help="ASSG level(s) in (0, 0.5), the paper's A/2, comma-separated: several run as an ensemble "
                        f"(per-image worst case); default {ASSG_LEVEL:g}, with --reliable "
                        f"{','.join(f'{v:g}' for v in RELIABLE_ASSG_LEVELS)}")
    p.add_argument("--gradients",
                   help=f"attacker gradients, comma-separated: {', '.join(GRADIENT_SOURCES)} (default own; ste: "
                        "straight-through, d spike / d u = 1; fitted: an arctangent window centred on each "
                        "channel's mean membrane potential on the clean batch, half-width "
                        f"{FITTED_WIDTH:g} standard deviation)")
    p.add_argument("--ensemble", action="store_true",
                   help=f"shortcut for --gradients {','.join(ENSEMBLE)} (per-image worst case)")
    p.add_argument("--eot", type=int, help="gradient draws averaged per step (default 1; 8 for Poisson models)")
    p.add_argument("--queries", type=int, default=1000, help="Square attack query budget")
    p.add_argument("--source", help="checkpoint of an independently trained model for the transfer attack")
    p.add_argument("--transfer-attack", default="pgd", choices=TRANSFER_ATTACKS,
                   help="what the transfer attack runs on --source, through the source's own surrogate, with the "
                        "budget of that attack here (--steps / --apgd-steps / --sapgd-steps; assg at every "
                        "--assg-level)")
    p.add_argument("--no-large-eps-check", action="store_true", help="skip the eps = 1 sanity check")
    p.add_argument("--data", help="data set (default: the checkpoint's)")
    p.add_argument("--data-dir", help="where the data set lives (train.run's --data-dir)")
    p.add_argument("--limit", type=int, default=1000, help="test images (0: all)")
    p.add_argument("--batch-size", type=int, default=250, help="test images per batch")
    p.add_argument("--seed", type=int, default=0, help="random seed (random starts, noise, Poisson draws)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
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
    if isinstance(old.get("settings"), dict):  # settings added since, at the value that evaluates as before
        old = {**old, "settings": {**SETTINGS_ADDED, **old["settings"]}}
    if old.get("version", 1) != key["version"]:
        raise ConfigError(f"--resume: {path} was made by a train.eval that counts differently (results version "
                          f"{old.get('version', 1)}, this one {key['version']}): evaluate again into another --out")
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


class Terminated(BaseException):
    """SIGTERM, as an exception (the evaluation stops as on Ctrl-C)."""


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    where = {}
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main_thread else None
    try:
        with contextlib.ExitStack() as held:  # the lock on --out, taken by _evaluate, released however it ends
            return _evaluate(argv, where, held)
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as e:
        what = "stopped by SIGTERM" if isinstance(e, Terminated) else "interrupted"
        print(f"{what}: " + (f"what finished is in {where['out'] / 'eval.json'}; continue with the same command "
                             f"with --out {where['out']} --resume" if "out" in where else "nothing was evaluated"),
              file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _evaluate(argv, where: dict, held: contextlib.ExitStack) -> int:
    command = "python -m train.eval " + " ".join(sys.argv[1:] if argv is None else argv)
    keep_freed_memory()
    try:
        args = build_parser().parse_args(argv)
        if args.device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", args.device):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
        check_device(args.device, "--device")
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
        if args.reliable and (args.attacks or args.gradients):
            raise ConfigError("--reliable sets the attacks and the gradients; drop --attacks / --gradients "
                              "(or drop --reliable)")
        if args.reliable:
            attacks = list(RELIABLE_ATTACKS) + (["transfer"] if args.source else [])
        else:
            attacks = parse_attacks(args.attacks) if args.attacks else list(DEFAULT_ATTACKS)
        try:
            eps = [fraction(e) for e in args.eps.split(",") if e.strip()]
        except argparse.ArgumentTypeError as e:
            raise ConfigError(f"--eps: {e}") from None
        try:
            assg_levels = ([float(v) for v in args.assg_level.split(",") if v.strip()] if args.assg_level is not None
                           else list(RELIABLE_ASSG_LEVELS) if args.reliable else [ASSG_LEVEL])
        except ValueError:
            raise ConfigError(f"--assg-level: expected numbers in (0, 0.5), got {args.assg_level!r}") from None
        if args.resume and not args.out:
            raise ConfigError("--resume needs --out, the folder of the evaluation to continue")
        gradients = (list(ENSEMBLE) if args.ensemble or args.reliable else
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
                                restarts=args.restarts,
                                assg_levels=assg_levels, gradients=gradients,
                                eot=args.eot or (8 if poisson else 1), n_queries=args.queries,
                                batch_size=args.batch_size, seed=args.seed,
                                large_eps_check=not args.no_large_eps_check, transfer_attack=args.transfer_attack)
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
                                     "source": args.source, "version": RESULTS_VERSION}))
        checkpoints = {n: str(Path(c)) for n, c in zip(names, args.checkpoint)}
        try:  # one train.eval per folder: a second one (a --resume started twice) is refused, naming the first
            held.enter_context(folder_lock(out, "train.eval"))
        except OSError as e:  # the folder (or its lock file) cannot be made: said of what failed
            raise WriteError.from_os_error(Path(e.filename) if e.filename else out / LOCK_NAME, e) from None
        previous = _previous(out, key, checkpoints) if args.resume else {}
        ensure_writable(out)  # before the evaluation starts (and not before the set-up: nothing left behind)
    except (ConfigError, CheckpointError, DataError, ValueError, WriteError, FolderBusy) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"mpd-triton train.eval: {len(images)} {data_name} test images, device {device}, attacks {attacks}, "
          f"eps {', '.join(eps_label(e) for e in eps)}, gradients {gradients}, eot {settings.eot}", flush=True)
    where["out"] = out
    if args.resume:
        for path in remove_leftovers(out):
            print(f"removed {path} (a temporary file left by an interrupted write)", flush=True)
    if args.compile is None and len(images) < settings.batch_size:  # said so, not as "0 passes"
        compile_models, why = False, (f"auto: {len(images)} images make no full batch of {settings.batch_size}, "
                                      "and only full batches run compiled")
    else:
        compile_models, why = should_compile(args.compile, evaluation_passes(settings, len(images)),
                                              unit="forward-backward passes")
    print(f"torch.compile: {'on' if compile_models else 'off'} ({why})", flush=True)
    results = []

    def save(in_progress: dict | None = None):  # after every batch: an interrupted evaluation keeps what it did
        write_json(out / "eval.json", {"command": command, "provenance": provenance(device), "key": key,
                                       "models": dict(zip(names, results)),
                                       **({IN_PROGRESS: in_progress} if in_progress else {})})

    unfinished = previous.get(IN_PROGRESS, {})
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
        r["provenance"] = provenance(device)  # the session that finished this model
        results.append(r)
        save()
    samples = {name: membrane_samples(model, images[:MEMBRANE_IMAGES].to(device), seed=args.seed)
               for name, (model, _) in zip(names, models)}
    diagnostics = {name: layer_diagnostics(model, images[:DIAGNOSTIC_IMAGES].to(device), settings.batch_size)
                   for name, (model, _) in zip(names, models)}
    write_text(out / "eval.md", eval_markdown(names, results, command, diagnostics))
    plot_robustness(names, results, out / "robustness.png")
    plot_membrane(samples, out / "membrane.png", "membrane potential of the evaluated models")
    problems = {name: diagnose(r["clean"], spec["num_classes"], diagnostics[name], r["n"])
                for name, r, (_, spec) in zip(names, results, models)}
    for name in names:  # before any robustness figure: on such a model they mean nothing
        if problems[name]:
            print(f"\n[{name}] {'; '.join(problems[name])}: robustness cannot be judged on this model, and its "
                  "masking checks neither", flush=True)
    print("\n" + eval_table(names, results))
    for name, r in zip(names, results):
        failed = [c for c in r["checks"] if not c["passed"]]
        if failed and not problems[name]:
            for c in failed:
                print(f"\n!!! {name}: sanity check {c['name']} FAILED: {c['detail']}", file=sys.stderr)
            print(f"!!! {name}: the robust accuracies may reflect gradient masking, not robustness", file=sys.stderr)
    print(f"\nwrote {out}/eval.json, eval.md, robustness.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
