"""Run configuration: presets, command line, validation.

Every knob of a run lives in ``RunConfig``; a preset is a set of overrides of
its defaults, and the command line overrides the preset. The config is stored
in every checkpoint and report.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

import mpd_triton as mt
from models import ENCODINGS, MODEL_NAMES, MODEL_WIDTHS, NeuronOptions
from mpd_triton.attacks import DEFAULT_ATTACKS
from mpd_triton.attacks.units import eps_label, parse_eps
from mpd_triton.neuron import check_real

from .compiling import COMPILE_MIN_STEPS
from .data import DATASETS

__all__ = ["RunConfig", "PRESETS", "PRESET_NOTES", "NEURON_FLAGS", "ConfigError", "parse_args", "build_parser", "fraction",
           "states_default"]


# How long a collective waits for the other ranks before it fails (--dist-timeout). A rank that dies
# closes its connections and the others stop at once; this bounds the wait for one that hangs. On the
# CPU the longest honest wait is rank 0 writing a checkpoint or one rank compiling the model before
# the other (minutes at most); torch's own default is 30 minutes.
DIST_TIMEOUT = 600.0


class ConfigError(ValueError):
    """A bad command-line value; the message is one line for the user."""


@dataclass
class RunConfig:
    preset: str = "quick"
    # model and data
    model: str = "small"
    data: str = "fmnist-subset"
    data_dir: str | None = None
    download: bool = False
    train_limit: int | None = None
    test_limit: int | None = None
    T: int = 4
    encoding: str = "direct"
    width: int | None = None  # the first conv's channels, the rest scale with it; None: the model's own
    classifier_bn: bool = False  # BatchNorm before the classifier's LIF layers too (BN before every LIF)
    # optimization
    epochs: int = 4
    batch_size: int = 64
    eval_batch_size: int = 500
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    # neurons: NeuronOptions' fields (models/common.py), the same names, order and defaults (tests/library/test_api.py
    # keeps them in step), one CLI flag each
    tau: float = 2.0
    v_th: float = 1.0
    v_reset: float | None = 0.0
    decay_input: bool = True
    detach_reset: bool = False
    surrogate: str = "triangle"
    surrogate_param: float | None = None
    window: float | None = None
    backend: str = "auto"
    # MPD-SGR
    eta: float = 0.0
    compare: bool = False  # train eta = 0 and eta = `eta` from the same seed, side by side
    gamma: float | None = None
    granularity: str = "time_channel"
    mpd_window: str = "surrogate"  # MPDSGR's window: the surrogate's gamma (the paper) or k standard deviations
    mpd_k: float = 1.0
    # the SR baseline (train/regularizers.py): CE + sr_lambda * its finite-difference gradient term
    sr_lambda: float = 0.0
    sr_h: float = 0.01
    # adversarial training (PGD)
    adv_train: bool = False
    adv_eps: float = 2 / 255
    adv_step: float = 1 / 255
    adv_steps: int = 2
    # evaluation at the end of training
    eval_attacks: str = ",".join(DEFAULT_ATTACKS)  # at eval_eps on eval_limit test images; '' for none
    eval_eps: float = 8 / 255
    eval_limit: int | None = 1000
    # run
    seed: int = 0
    device: str = "auto"
    bf16: bool = False
    compile: bool | None = None  # torch.compile the model; None: when the run is long enough (train/compiling.py)
    channels_last: bool | None = None  # channels-last activations; None: on for the CPU (train/compiling.py)
    deterministic: bool = False
    out: str | None = None
    force: bool = False  # start the runs in `out` over: their checkpoints and models are removed first
    keep_previous: bool = False  # keep the previous epoch's checkpoint as checkpoint.previous.pt
    dist_timeout: float = DIST_TIMEOUT  # seconds a collective waits for the other ranks (torchrun)
    quiet: bool = False  # print only the result (no progress, no per-epoch lines)
    tensorboard: bool = False  # TensorBoard scalars in RUN/<run>/tensorboard (train/tensorboard.py)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def model_options(self) -> dict:
        """The architecture options of this run that the model builder takes (those set)."""
        options = {} if self.width is None else {"width": self.width}
        return {**options, "classifier_bn": True} if self.classifier_bn else options

    def mpd_options(self) -> mt.MPDOptions:
        """MPD-SGR's options of this run, validated by the library (ValueError on a bad one)."""
        return mt.MPDOptions(granularity=self.granularity, gamma=self.gamma, window=self.mpd_window, k=self.mpd_k)

    def neuron_options(self) -> dict:
        """The NeuronOptions fields of this run (RunConfig keeps them flat: one CLI flag each)."""
        return {f.name: getattr(self, f.name) for f in fields(NeuronOptions)}


# The paper protocol (docs/training.md): T = 8, SGD lr 0.1, momentum 0.9, weight decay 5e-4, cosine schedule,
# batch 128, 200 epochs; AT: PGD 2/255, 1/255, 2 steps. eta: the paper's value is not known to us. Without
# BatchNorm before the hidden LIF, eta = 1 silences the small network (docs/training.md); with BatchNorm before
# every LIF (--classifier-bn) it trains to within a point of the plain model (docs/study/README.md). The VGG presets'
# 0.01 is a starting point to tune, not a reproduction of the paper.
_PAPER_SGD = dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine")
_PAPER = dict(_PAPER_SGD, T=8, batch_size=128, epochs=200, eval_limit=None)
PRESETS: dict[str, dict] = {
    # The default run: the study's setting (BatchNorm before every LIF, the paper's SGD and cosine schedule,
    # eta = 1) shrunk to 3 epochs on the bundled subset, plain vs MPD-SGR, so that it shows what the study found.
    "quick": dict(_PAPER_SGD, model="small", classifier_bn=True, data="fmnist-subset", T=4, epochs=3, batch_size=64,
                  eta=1.0, compare=True, eval_limit=500),
    # The MPD-SGR study (docs/study/README.md): the full Fashion-MNIST, the small net with BatchNorm before every LIF
    # (the setting of MPD-SGR's theory), the paper's optimizer and schedule, 15 epochs.
    "study": dict(_PAPER_SGD, model="small", classifier_bn=True, data="fmnist", T=4, epochs=15, batch_size=128,
                  eta=1.0, compare=True, eval_limit=1000),
    "fmnist-vgg11": dict(model="vgg11", data="fmnist", T=8, epochs=10, batch_size=128, optimizer="adam", lr=1e-3,
                         eta=0.01, compare=True, eval_limit=None),
    "cifar10-vgg11": dict(_PAPER, model="vgg11", data="cifar10", eta=0.01, compare=True),
    "cifar10-vgg11-at": dict(_PAPER, model="vgg11", data="cifar10", eta=0.01, compare=True, adv_train=True),
    "cifar100-wrn16": dict(_PAPER, model="wrn16", data="cifar100", eta=0.01, compare=True),
    "tinyimagenet-vgg16": dict(_PAPER, model="vgg16", data="tinyimagenet", eta=0.01, compare=True, epochs=100),
}

# Where to read what the study found with the setting of these presets (train.run prints it under the
# comparison and writes it into comparison.md); the findings themselves live in docs/study/README.md, not in code.
STUDY_POINTER = ("What MPD-SGR did in this setting at full scale (the full Fashion-MNIST, several seeds, the "
                 "strongest attacks): docs/study/README.md")
PRESET_NOTES: dict[str, str] = {"quick": STUDY_POINTER, "study": STUDY_POINTER}

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "step", "constant")


def fraction(text: str) -> float:
    """'8/255' or '0.03' -> float (argparse's type for eps-like options)."""
    try:
        return parse_eps(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "soft") else fraction(text)


_SWITCH = dict(action=argparse.BooleanOptionalAction, default=None)

# The command line of each NeuronOptions field (models/common.py; the fields and their defaults are
# LIFConfig's and NeuronOptions'): argparse's arguments for its --flag. A neuron option added there
# needs its line here (tests/training/test_train.py checks that every field has one).
NEURON_FLAGS: dict[str, dict] = {
    "tau": dict(type=fraction, help="membrane time constant (inf: integrate-and-fire)"),
    "v_th": dict(type=fraction, help="firing threshold"),
    "v_reset": dict(type=_optional_float, help="hard-reset value, or 'none' for a soft reset"),
    "decay_input": dict(_SWITCH, help="the leak also scales the input: h = v + (x - (v - v_rest)) / tau"),
    "detach_reset": dict(_SWITCH, help="no gradient through the reset"),
    "surrogate": dict(help=f"one of: {', '.join(mt.SURROGATE_NAMES)}"),
    "surrogate_param": dict(type=float, help="gamma (triangle, rectangular) or alpha (sigmoid, atan, superspike)"),
    "window": dict(type=float, help="MPD-SGR window of a smooth surrogate (sigmoid, atan, superspike; default: where "
                                    "g falls to a tenth of its peak); the triangle's and rectangular's window is "
                                    "their gamma"),
    "backend": dict(help=f"LIF backend: {', '.join(mt.BACKENDS)}"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other bad input, instead of usage + exit
        raise ConfigError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m train.run",
        description="Train a spiking network with MPD-SGR (and optionally adversarial training). "
                    "With no arguments: the 'quick' preset, a small SNN on the bundled Fashion-MNIST subset, "
                    "trained plain and with MPD-SGR from the same seed and compared. Every option's default is "
                    "the chosen preset's value; --help shows the quick preset's (and what the other presets set).",
    )
    a = p.add_argument
    a("--preset", help=f"one of: {', '.join(PRESETS)} (default: quick, or the --config file's)")
    a("--config", help="a run's config.json: train with its settings again (into a new --out unless one is given; "
                       "options given here override it)")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help=f"one of: {', '.join(MODEL_NAMES)}")
    g.add_argument("--data", help=f"one of: {', '.join(DATASETS)}")
    g.add_argument("--data-dir", help="where the data set lives (see train/data.py for the layouts)")
    g.add_argument("--download", action="store_true", default=None, help="download CIFAR / Fashion-MNIST if missing")
    g.add_argument("--train-limit", type=int, help="use only the first N training images")
    g.add_argument("--test-limit", type=int, help="use only the first N test images")
    g.add_argument("--T", "-T", type=int, help="time steps")
    g.add_argument("--encoding", help=f"one of: {', '.join(ENCODINGS)}")
    g.add_argument("--width", type=int, help=f"channels of the first conv layer, the others scale with it "
                                             f"({', '.join(f'{m} {w}' for m, w in MODEL_WIDTHS.items())} by default)")
    g.add_argument("--classifier-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="BatchNorm before the classifier's LIF layers too, so that BatchNorm precedes every LIF "
                        f"({', '.join(m for m in MODEL_WIDTHS)})")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, help="passes over the training images")
    g.add_argument("--batch-size", type=int, help="training images per optimizer step")
    g.add_argument("--eval-batch-size", type=int, help="images per batch when testing and attacking")
    g.add_argument("--optimizer", help=f"one of: {', '.join(OPTIMIZERS)}")
    g.add_argument("--lr", type=float, help="learning rate (the schedule's peak)")
    g.add_argument("--momentum", type=float, help="SGD momentum (Adam: its beta1 is its own)")
    g.add_argument("--weight-decay", type=float, help="L2 weight decay")
    g.add_argument("--schedule", help=f"one of: {', '.join(SCHEDULES)}")
    g = p.add_argument_group("neurons")
    for f in fields(NeuronOptions):
        g.add_argument(f"--{f.name.replace('_', '-')}", **NEURON_FLAGS[f.name])
    g = p.add_argument_group("MPD-SGR")
    g.add_argument("--eta", type=float, help="regularizer weight (0: plain training)")
    g.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                   help="train eta = 0 and the given eta from the same seed and compare them")
    g.add_argument("--gamma", type=float, help="window half-width for all layers (default: each surrogate's)")
    g.add_argument("--granularity", help=f"one of: {', '.join(mt.GRANULARITIES)}")
    g.add_argument("--mpd-window", help=f"one of: {', '.join(mt.MPD_WINDOWS)}: the surrogate's window [-gamma, gamma] "
                                        "(the paper), or [-k sigma, k sigma] with each cell's own sigma (mt.MPDSGR)")
    g.add_argument("--mpd-k", type=float, help="the relative window's half-width in standard deviations")
    g = p.add_argument_group("SR baseline (Liu et al. 2024, train/regularizers.py)")
    g.add_argument("--sr-lambda", type=float, help="weight of SR's input-gradient term (0: off)")
    g.add_argument("--sr-h", type=float, help="SR's finite-difference step")
    g = p.add_argument_group("adversarial training")
    g.add_argument("--adv-train", action=argparse.BooleanOptionalAction, default=None, help="PGD adversarial training")
    g.add_argument("--adv-eps", type=fraction, help="L-inf radius of the training attack, in pixel units (8/255 "
                                                    "or 0.03)")
    g.add_argument("--adv-step", type=fraction, help="step of the training attack")
    g.add_argument("--adv-steps", type=int, help="PGD steps of the training attack")
    g = p.add_argument_group("evaluation after training")
    g.add_argument("--eval-attacks", help="comma-separated attacks run on the final model ('' for none); the same "
                                          "default as python -m train.eval, at the one eps --eval-eps to keep the "
                                          "run short (train.eval takes an eps list)")
    g.add_argument("--eval-eps", type=fraction, help="L-inf radius of the attacks after training")
    g.add_argument("--eval-limit", type=int, help="test images used by the attacks (0: all)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, help="random seed (initialization, data order, attacks)")
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bfloat16 autocast")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="run the model under torch.compile (full batches); default: when the run has at least "
                        f"{COMPILE_MIN_STEPS} training steps, where compiling pays")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="keep activations in torch.channels_last; default: on for the CPU, where it is faster")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                   help="torch's deterministic algorithms (slower; CPU runs are repeatable without it)")
    g.add_argument("--out", help="run folder (default runs/<preset>-<time>)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out (default: the newest runs/<preset>-*)")
    g.add_argument("--force", action="store_true", default=None,
                   help="start the run in --out over: its checkpoints and models are removed first")
    g.add_argument("--keep-previous", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the previous epoch's checkpoint too (checkpoint.previous.pt), to fall back on if the "
                        "last one is damaged")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                   help="also write TensorBoard scalars (loss, accuracy, Omega per layer, firing rates, robust "
                        "accuracy) to RUN/<run>/tensorboard; needs the tensorboard package")
    g.add_argument("--quiet", action="store_true", default=None,
                   help="print only the result: no progress bar or progress lines, no per-epoch lines")
    g.add_argument("--dist-timeout", type=float,
                   help=f"seconds a collective waits for the other processes under torchrun (default {DIST_TIMEOUT:g})")
    _show_defaults(p)
    return p


# What an option left at None means (RunConfig keeps None for "decided elsewhere").
_NONE_MEANS = {"width": "the model's own", "train_limit": "all", "test_limit": "all", "eval_limit": "all", "compile": "auto",
               "channels_last": "auto", "surrogate_param": "the surrogate's own", "data_dir": "none",
               "v_reset": "soft reset"}


_STATES_DEFAULT = re.compile(r"\bdefault:|\(default\b")


def states_default(help_text: str | None) -> bool:
    """Whether an option's help already says what its default is ("default: ...", "(default ...)"); such
    help gets no second note."""
    return bool(help_text and _STATES_DEFAULT.search(help_text))


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append each option's effective default to its help: the quick preset's value, and the
    values other presets set. (The parser's own defaults are None, meaning "the preset's".)"""
    base = {**RunConfig().to_dict(), **PRESETS["quick"]}
    for action in parser._actions:
        name = action.dest
        if name not in base or name == "preset" or states_default(action.help):
            continue
        by_value: dict[str, list[str]] = {}
        for preset, values in PRESETS.items():
            if preset != "quick" and name in values and values[name] != base[name]:
                by_value.setdefault(_shown(name, values[name]), []).append(preset)
        note = f"default: {_shown(name, base[name])}" + "".join(
            f"; {value} in {', '.join(presets)}" for value, presets in by_value.items())
        action.help = f"{action.help} ({note})" if action.help else f"({note})"


# Options in pixel units of images in [0, 1]: shown as the papers write them (8/255, not 0.0313725).
_EPS_OPTIONS = ("adv_eps", "adv_step", "eval_eps")


def _shown(name: str, value) -> str:
    if value is None:
        return _NONE_MEANS.get(name, "none")
    if name in _EPS_OPTIONS:
        return eps_label(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def parse_args(argv=None) -> tuple[RunConfig, bool]:
    """-> (config, resume). Raises ConfigError with a one-line message on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    names = {f.name for f in fields(RunConfig)}
    saved = _read_config(args.config, names) if args.config else {}
    preset = args.preset or saved.get("preset", "quick")
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = RunConfig().to_dict()
    values.update(PRESETS[preset])
    if args.preset is None:  # the saved run's settings (an explicit --preset starts from that preset instead)
        values.update(saved)
    values["preset"] = preset
    for key, value in vars(args).items():
        if key in names and value is not None and key != "preset":
            values[key] = value
    if args.eval_limit == 0:
        values["eval_limit"] = None
    if args.classifier_bn is None and values["model"] not in MODEL_WIDTHS:
        values["classifier_bn"] = False  # a preset's --classifier-bn applies only to the models that have it
    cfg = RunConfig(**values)
    if args.resume and cfg.force:
        raise ConfigError("--resume continues the run, --force starts it over: give one of them")
    validate(cfg)
    return cfg, args.resume


# Where a run went and whether it started over: not part of what a rerun of its config.json repeats.
_NOT_RERUN = ("out", "force", "quiet")


def _read_config(path: str, names: set[str]) -> dict:
    """The settings of a run's config.json (train.run writes one in every run folder), for --config."""
    import json

    try:
        saved = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise ConfigError(f"--config {path}: not a JSON file ({e})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"--config {path}: expected the config.json of a train.run run folder")
    unknown = sorted(set(saved) - names)
    if unknown:
        raise ConfigError(f"--config {path}: settings this train.run does not have: {', '.join(unknown)} (a "
                          "config of another version?)")
    return {k: v for k, v in saved.items() if k not in _NOT_RERUN}


def check_device(device: str, flag: str) -> None:
    """ConfigError (one line) for a CUDA device this machine does not have."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        why = ("this torch was built without CUDA" if torch.version.cuda is None else
               f"torch {torch.__version__} finds no CUDA device")
        raise ConfigError(f"{flag} {device}: CUDA is not available here ({why}); use --device cpu (or auto)")
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"numbered from 0")


def _positive_int(name, value):
    if value is not None and value < 1:
        raise ConfigError(f"{name} must be >= 1, got {value}")


# The library's names of MPD-SGR's options, as the command line spells them.
_MPD_FLAGS = {"window must be one of": "--mpd-window must be one of", "k (the relative window's": "--mpd-k (the "
              "relative window's", "gamma sets the surrogate window; the relative window is set by k":
              "--gamma sets the surrogate window; the relative window is set by --mpd-k"}


def _flag_names(message: str) -> str:
    for library, flag in _MPD_FLAGS.items():
        if message.startswith(library):
            return flag + message[len(library):]
    return message


def validate(cfg: RunConfig) -> None:
    if cfg.model not in MODEL_NAMES:
        raise ConfigError(f"unknown model {cfg.model!r}; choose one of {', '.join(MODEL_NAMES)}")
    if cfg.data not in DATASETS:
        raise ConfigError(f"unknown data set {cfg.data!r}; choose one of {', '.join(DATASETS)}")
    if cfg.encoding not in ENCODINGS:
        raise ConfigError(f"unknown encoding {cfg.encoding!r}; choose one of {', '.join(ENCODINGS)}")
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {cfg.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    try:  # MPD-SGR's options and eta, the neuron's: checked by the library's own validation
        cfg.mpd_options()
        check_real("eta", cfg.eta, nonnegative=True)
        NeuronOptions(**cfg.neuron_options()).make()
    except (ValueError, TypeError) as e:
        raise ConfigError(_flag_names(str(e))) from None
    if (cfg.width is not None or cfg.classifier_bn) and cfg.model not in MODEL_WIDTHS:
        raise ConfigError(f"--width and --classifier-bn are options of {', '.join(MODEL_WIDTHS)}, not of {cfg.model}")
    for name in ("T", "width", "epochs", "batch_size", "eval_batch_size", "adv_steps", "train_limit", "test_limit",
                 "eval_limit"):
        _positive_int(name, getattr(cfg, name))
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ConfigError(f"lr must be > 0, got {cfg.lr}")
    if cfg.momentum < 0 or cfg.weight_decay < 0:
        raise ConfigError("momentum and weight decay must be >= 0")
    if not (cfg.sr_lambda >= 0 and math.isfinite(cfg.sr_lambda)):
        raise ConfigError(f"sr lambda must be >= 0, got {cfg.sr_lambda}")
    if not (cfg.sr_h > 0 and math.isfinite(cfg.sr_h)):
        raise ConfigError(f"sr h must be > 0, got {cfg.sr_h}")
    if cfg.sr_lambda > 0 and cfg.bf16:
        raise ConfigError("--sr-lambda with --bf16: SR's finite difference (a logit step of h = 0.01 of its "
                          "gradient) is below bfloat16's resolution of the logits; train SR in float32")
    if cfg.compare and cfg.eta == 0:
        raise ConfigError("--compare trains eta = 0 against the given eta: give an --eta > 0")
    for name in ("adv_eps", "adv_step", "eval_eps"):
        value = getattr(cfg, name)
        if not (0 <= value <= 1):
            raise ConfigError(f"{name.replace('_', ' ')} must be in [0, 1] (images are in [0, 1]), got {value}")
    try:
        from mpd_triton.attacks.evaluation import parse_attacks

        if "transfer" in parse_attacks(cfg.eval_attacks):
            raise ConfigError("the transfer attack needs a source model: use python -m train.eval --source")
    except ValueError as e:
        raise ConfigError(f"--eval-attacks: {e}") from None
    if not (cfg.dist_timeout > 0 and math.isfinite(cfg.dist_timeout)):
        raise ConfigError(f"dist timeout must be > 0 seconds, got {cfg.dist_timeout}")
    if cfg.device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", cfg.device):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    check_device(cfg.device, "--device")
    if cfg.tensorboard:
        from .tensorboard import MISSING

        if MISSING:
            raise ConfigError(MISSING)
