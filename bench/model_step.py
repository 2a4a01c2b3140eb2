"""Model-level benchmark: one training step of a spiking model with MPD-SGR on, per neuron implementation.

    python -m bench.model_step --model vgg11      # T = 8, batch 128, 32 x 32 inputs (on CUDA)
    python -m bench.kernels --model vgg11         # the same
    python -m bench.kernels --model small         # the quick preset's model and batch (on the CPU too)

A step is zero_grad, forward, cross-entropy + eta * L_MPD (mt.MPDSGR), backward
and an SGD update (the papers' protocol: lr 0.1, momentum 0.9, weight decay
5e-4). The model is the same in every variant; only its LIF layers differ, and
whether the model runs under ``torch.compile``: ``mpd_triton`` (the Triton
kernels), ``mpd_triton_cpu`` (the fused C kernels), ``torch_eager`` (the
reference layers), ``spikingjelly`` (spikingjelly's neuron with PyTorch
statistics, see bench/peers.py), and ``mpd_triton_compile`` / ``torch_compile``
/ ``mpd_triton_cpu_compile`` (the Triton kernels / the reference layers / the C
kernels with the model under ``torch.compile``; the first step, which compiles,
is reported apart). Writes model_results.json (after every variant, with
``"complete": false`` until the last, so a stopped run keeps the variants it
timed) and model_results.md to --out.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

import mpd_triton as mt
from models import MODEL_NAMES, NeuronOptions, build_model
from plumbing.files import ensure_writable, write_text
from plumbing.memory import keep_freed_memory
from train.config import PRESETS, RunConfig

from .cli import command_line, default_out, first_line, write_errors_in_one_line
from .measure import describe_failure, machine_info, peak_memory, time_call
from .peers import SpikingJellyLIF
from .providers import MPD_ETA, NEURON, PROVIDERS, Provider
from .report import (
    evaluate_targets,
    markdown_table,
    model_table,
    targets_table,
    text_table,
    write_json,
)

__all__ = ["main", "VARIANTS", "MODEL_RECORD_FIELDS", "build_variant", "run_variants", "QUICK_MODEL"]

# Variant -> (the mt.LIF backend its model is built with, compiled with torch.compile, the provider whose
# availability it shares); spikingjelly then swaps every LIF layer.
VARIANTS = {
    "mpd_triton": ("triton", False, "mpd_triton"),
    "mpd_triton_cpu": ("cpu", False, "mpd_triton_cpu"),
    "torch_eager": ("torch", False, "torch_eager"),
    "spikingjelly": ("torch", False, "spikingjelly"),
    "torch_compile": ("torch", True, "torch_compile"),
    "mpd_triton_compile": ("triton", True, "mpd_triton"),
    "mpd_triton_cpu_compile": ("cpu", True, "mpd_triton_cpu"),
}
DEFAULT_VARIANTS = ("mpd_triton", "mpd_triton_cpu", "torch_eager", "spikingjelly")

CUDA_DEFAULTS = dict(T=8, batch=128, image_size=32, rep_ms=2000.0)
CUDA_QUICK = dict(T=8, batch=128, image_size=32, rep_ms=500.0)
CPU_DEFAULTS = dict(T=2, batch=2, image_size=32, rep_ms=200.0)  # harness check only for the big models
CPU_QUICK = dict(T=2, batch=1, image_size=32, rep_ms=50.0)
# The quick preset's model, its options (BatchNorm before every LIF) and batch, read from
# train/config.py's PRESETS["quick"]: the CPU training step of the CPU targets (docs/benchmarks.md),
# on Fashion-MNIST's 28 x 28 one-channel images.
_QUICK = RunConfig(**PRESETS["quick"])
QUICK_MODEL = dict(T=_QUICK.T, batch=_QUICK.batch_size, image_size=28, in_channels=1,
                   model_options=_QUICK.model_options())
SMALL_CPU = dict(QUICK_MODEL, rep_ms=3000.0)
NUM_CLASSES = 10

MODEL_RECORD_FIELDS = ("provider", "implementation", "model", "T", "batch", "image_size", "dtype", "median_ms",
                       "p20_ms", "p80_ms", "timer", "first_step_ms", "peak_memory_bytes", "peak_memory_note",
                       "loss_first", "loss_last", "skipped")


def _swap_lif_layers(model: torch.nn.Module, make) -> int:
    """Replace every mt.LIF in model by make(layer); returns how many were replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, mt.LIF):
                setattr(parent, name, make(child))
                replaced += 1
    return replaced


def build_variant(variant: str, model_name: str, *, T: int, image_size: int, device: torch.device,
                  in_channels: int = 3, channels_last: bool = False, model_options: dict | None = None):
    """(model, MPDSGR regularizer, the module a step calls: the model or its compiled form) for one variant;
    channels_last: the model's weights, and so its activations, in torch.channels_last; model_options:
    architecture options of the model builder (``classifier_bn``, ``width``)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
    backend, compiled, _ = VARIANTS[variant]
    neuron = NeuronOptions.from_config(NEURON, backend=backend)
    model = build_model(model_name, in_channels=in_channels, num_classes=NUM_CLASSES, image_size=image_size, T=T,
                        neuron=neuron, **(model_options or {}))
    if variant == "spikingjelly":
        _swap_lif_layers(model, SpikingJellyLIF.like)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    reg = mt.MPDSGR(model, eta=MPD_ETA)
    return model, reg, (torch.compile(model) if compiled else model)


def _training_step(model, reg, images, labels, forward=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    forward = model if forward is None else forward
    losses = []

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(forward(images), labels) + reg()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())

    return step, losses


def _model_record(variant, implementation, model_name, T, batch, image_size, **measured) -> dict:
    record = dict(provider=variant, implementation=implementation, model=model_name, T=T, batch=batch,
                  image_size=image_size, dtype="float32", median_ms=None, p20_ms=None, p80_ms=None, timer=None,
                  first_step_ms=None, peak_memory_bytes=None, peak_memory_note=None, loss_first=None, loss_last=None,
                  skipped=None)
    record.update(measured)
    assert tuple(record) == MODEL_RECORD_FIELDS, "a model measurement must carry exactly MODEL_RECORD_FIELDS"
    return record


def _implementation(variant: str, provider: Provider, device: torch.device) -> str:
    implementation = provider.implementation(device)
    if VARIANTS[variant][1] and not implementation.startswith("torch.compile"):
        implementation += ", model under torch.compile"
    return implementation


def run_variants(variants: dict[str, Provider], model_name: str, *, T: int, batch: int, image_size: int,
                 device: torch.device, warmup_ms: float, rep_ms: float, strict: bool = False,
                 in_channels: int = 3, channels_last: bool = False, model_options: dict | None = None,
                 on_variant_done=None) -> list[dict]:
    """Time one training step per variant (name -> the provider whose availability it shares);
    on_variant_done(records): called after each variant with the records so far (to save them)."""
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.rand((batch, in_channels, image_size, image_size), generator=gen, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=gen, device=device)
    records = []
    for variant, provider in variants.items():
        unavailable = provider.unavailable(device, torch.float32)
        implementation = None if unavailable else _implementation(variant, provider, device)
        common = (variant, implementation, model_name, T, batch, image_size)
        if unavailable:
            records.append(_model_record(*common, skipped=unavailable))
            if on_variant_done is not None:
                on_variant_done(records)
            continue
        try:
            torch.manual_seed(0)  # the same initial weights in every variant
            model, reg, forward = build_variant(variant, model_name, T=T, image_size=image_size, device=device,
                                                in_channels=in_channels, channels_last=channels_last,
                                                model_options=model_options)
            step, losses = _training_step(model, reg, images, labels, forward)
            start = time.perf_counter()
            step()  # the first step (compilation for the compiled variants), timed apart
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first_ms = (time.perf_counter() - start) * 1e3
            timing = time_call(step, device, warmup_ms=warmup_ms, rep_ms=rep_ms)
            peak, peak_note = peak_memory(step, device)
            measured = dict(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                            timer=timing.timer, first_step_ms=first_ms, peak_memory_bytes=peak,
                            peak_memory_note=peak_note, loss_first=float(losses[0]), loss_last=float(losses[-1]))
            del model, reg, forward, step, losses
        except Exception as error:  # recorded, unless --strict
            if strict:
                raise
            traceback.print_exc(file=sys.stderr)
            measured = dict(skipped=describe_failure(error))
        records.append(_model_record(*common, **measured))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if on_variant_done is not None:
            on_variant_done(records)
    return records


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.model_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODEL_NAMES, default="vgg11")
    parser.add_argument("--quick", action="store_true",
                        help="fewer timed steps (and a batch of 1 on the CPU, except for --model small)")
    parser.add_argument("--providers", nargs="+", choices=tuple(VARIANTS),
                        help=f"variants to time (default: {' '.join(DEFAULT_VARIANTS)}, and on the CPU with "
                             "--model small also the two compiled ones)")
    parser.add_argument("--T", type=int, help="time steps (default 8 on CUDA)")
    parser.add_argument("--batch", type=int, help="batch size (default 128 on CUDA)")
    parser.add_argument("--image-size", type=int, help="input height and width (default 32)")
    parser.add_argument("--width", type=int,
                        help="the model's first conv channels (default: the model's own, 64 for vgg11); a "
                             "narrow model checks the harness quickly without a GPU")
    parser.add_argument("--out", type=Path, help="output folder (default runs/bench/model-<UTC time>)")
    parser.add_argument("--warmup-ms", type=float, default=200.0)
    parser.add_argument("--rep-ms", type=float, help="timed repetitions per variant (default 2000 on CUDA)")
    parser.add_argument("--strict", action="store_true", help="stop at the first error instead of recording it")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="every variant's model in torch.channels_last (default: on for the CPU, as train.run)")
    return parser


@write_errors_in_one_line
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    keep_freed_memory()  # steady-state timings: no page faults from reallocated buffers
    parser = build_parser()
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        defaults = CUDA_QUICK if args.quick else CUDA_DEFAULTS
    elif args.model == "small":  # the quick preset's step: what CPU users train
        defaults = dict(SMALL_CPU, rep_ms=SMALL_CPU["rep_ms"] / (4 if args.quick else 1))
    else:
        defaults = CPU_QUICK if args.quick else CPU_DEFAULTS
    in_channels = defaults.get("in_channels", 3)
    model_options = defaults.get("model_options")
    channels_last = args.channels_last if args.channels_last is not None else device.type == "cpu"
    T = args.T or defaults["T"]
    batch = args.batch or defaults["batch"]
    image_size = args.image_size or defaults["image_size"]
    rep_ms = args.rep_ms or defaults["rep_ms"]
    if args.width is not None:
        model_options = {**(model_options or {}), "width": args.width}
    for name, value in (("--T", T), ("--batch", batch), ("--image-size", image_size), ("--width", 1 if args.width is None else args.width)):
        if value < 1:
            parser.error(f"{name} must be a positive integer, got {value}")
    for name, value in (("--warmup-ms", args.warmup_ms), ("--rep-ms", rep_ms)):
        if not value > 0:
            parser.error(f"{name} must be > 0, got {value}")
    print(first_line(device, f"{args.model} training-step benchmark"), flush=True)
    out_dir = ensure_writable(args.out or default_out("model"))

    names = args.providers or list(DEFAULT_VARIANTS) + (
        ["torch_compile", "mpd_triton_cpu_compile"] if device.type == "cpu" and args.model == "small" else [])
    variants = {name: PROVIDERS[VARIANTS[name][2]] for name in dict.fromkeys(names)}
    info = machine_info(device)
    command = command_line(argv, "bench.model_step")
    json_path = out_dir / "model_results.json"

    def payload(records: list[dict], complete: bool) -> dict:
        return {"benchmark": "model_step", "complete": complete,  # False in the copies saved while it runs
                "command": command,
                "first_line": first_line(device, f"{args.model} training-step benchmark"), "machine": info,
                "settings": {"model": args.model, "T": T, "batch": batch, "image_size": image_size,
                             "in_channels": in_channels, "channels_last": channels_last,
                             "model_options": model_options or {}, "warmup_ms": args.warmup_ms, "rep_ms": rep_ms,
                             "eta": MPD_ETA, "optimizer": "SGD lr 0.1, momentum 0.9, weight decay 5e-4"},
                "measurements": records,
                "targets": evaluate_targets([], records, on_gpu=device.type == "cuda")}

    records = run_variants(variants, args.model, T=T, batch=batch, image_size=image_size, device=device,
                           warmup_ms=args.warmup_ms, rep_ms=rep_ms, strict=args.strict, in_channels=in_channels,
                           channels_last=channels_last, model_options=model_options,
                           on_variant_done=lambda partial: write_json(json_path, payload(partial, complete=False)))
    final = payload(records, complete=True)
    write_json(json_path, final)
    targets = final["targets"]
    headers, rows = model_table(records)
    target_headers, target_rows = targets_table(targets)
    print(text_table(headers, rows))
    print("\nTargets:")
    print(text_table(target_headers, target_rows))

    where = info.get("gpu") or f"CPU ({info['cpu']}, {info['cpu_count']} cores)"
    markdown = "\n".join([
        f"# {args.model} training step with MPD-SGR", "",
        f"- {final['first_line']}",
        f"- machine: {where}; torch {info['torch']}, triton {info['triton']}",
        f"- date (UTC): {info['date_utc']}",
        f"- command: `{command}`",
        f"- step: T = {T}, batch {batch}, {image_size} x {image_size} x {in_channels} images, "
        f"{'channels-last' if channels_last else 'contiguous'} activations, SGD + cross-entropy + {MPD_ETA} L_MPD"
        + (f"; model options {model_options}" if model_options else ""),
        "",
        markdown_table(headers, rows), "",
        "## Targets", "",
        markdown_table(target_headers, target_rows), "",
    ])
    write_text(out_dir / "model_results.md", markdown)
    print(f"\nwrote {out_dir / 'model_results.json'} and {out_dir / 'model_results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
