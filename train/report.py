"""Reports: of a training run (report.json, report.md and plots: membrane potential histograms
with the surrogate window, Omega per epoch, loss and accuracy, the per-layer diagnostics) and
of an evaluation (train.eval's table, eval.md and robustness.png)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import mpd_triton as mt  # noqa: E402
from plumbing.files import optional_plot, save_figure, write_json, write_text  # noqa: E402
from plumbing.provenance import provenance  # noqa: E402

from .config import eps_label  # noqa: E402
from .diagnostics import diagnostics_table  # noqa: E402

__all__ = ["membrane_samples", "write_run_report", "write_comparison", "plot_curves", "plot_membrane", "eval_table",
           "eval_markdown", "plot_robustness"]


@torch.no_grad()
def membrane_samples(model: torch.nn.Module, x: torch.Tensor, max_per_layer: int = 20_000,
                     seed: int = 0) -> list[dict]:
    """u = h - V_th of every LIF layer for a batch x (eval mode), subsampled; with each layer's window."""
    layers = [m for m in model.modules() if isinstance(m, mt.LIF)]
    inputs: dict[int, torch.Tensor] = {}

    def keep_input(i):
        def hook(module, args, output):
            inputs.setdefault(i, args[0].detach())  # returns nothing: a returned value would replace the output

        return hook

    hooks = [layer.register_forward_hook(keep_input(i)) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, layer in enumerate(layers):
        u = mt.lif_reference(inputs[i].float().cpu(), layer.config).u.flatten()
        if u.numel() > max_per_layer:
            u = u[torch.randperm(u.numel(), generator=g)[:max_per_layer]]
        out.append({"layer": i, "window": layer.surrogate.window, "u": u.numpy()})
    return out


def _hist_range(values: list[np.ndarray], window: float) -> tuple[float, float]:
    """The central 98% of the values, widened to show at least [-3 gamma, 3 gamma]."""
    lo, hi = np.percentile(np.concatenate(values), [1.0, 99.0])
    lo, hi = min(lo, -3.0 * window), max(hi, 3.0 * window)
    span = hi - lo
    return float(lo - 0.05 * span), float(hi + 0.05 * span)


@optional_plot()
def plot_membrane(sample_sets: dict[str, list[dict]], path: Path, title: str) -> None:
    """One panel per LIF layer: the histogram of u of each run, the window [-gamma, gamma] shaded."""
    names = list(sample_sets)
    n_layers = len(sample_sets[names[0]])
    cols = min(4, n_layers)
    rows = -(-n_layers // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False)
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        if i >= n_layers:
            ax.axis("off")
            continue
        window = sample_sets[names[0]][i]["window"]
        lo, hi = _hist_range([sample_sets[name][i]["u"] for name in names], window)
        bins = np.linspace(lo, hi, 81)
        ax.axvspan(-window, window, color="tab:red", alpha=0.12, label="SG window")
        for name in names:
            u = sample_sets[name][i]["u"]
            inside = float(np.mean(np.abs(u) <= window))
            ax.hist(np.clip(u, lo, hi), bins=bins, density=True, histtype="step", linewidth=1.3,
                    label=f"{name} ({100 * inside:.0f}% in window)")
        ax.axvline(0.0, color="k", linewidth=0.6)
        ax.set_title(f"LIF layer {i + 1}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlim(lo, hi)
        ax.legend(fontsize=6)
    fig.suptitle(f"{title}: membrane potential u = h - V_th (values outside the range piled at its edges)",
                 fontsize=10)
    fig.supxlabel("u", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


@optional_plot()
def plot_curves(histories: dict[str, list[dict]], path: Path) -> None:
    """Omega, loss and accuracy per epoch for each run."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for name, history in histories.items():
        epochs = [h["epoch"] for h in history]
        axes[0].plot(epochs, [h["test_omega"] for h in history], marker="o", label=f"{name} (test)")
        # the training lines get markers too: after one epoch a line without one draws nothing
        axes[0].plot(epochs, [h["train_omega"] for h in history], linestyle="--", marker="x", alpha=0.6,
                     label=f"{name} (train)")
        axes[1].plot(epochs, [h["train_loss"] for h in history], marker="o", label=name)
        axes[2].plot(epochs, [100 * h["test_acc"] for h in history], marker="o", label=f"{name} (test)")
        axes[2].plot(epochs, [100 * h["train_acc"] for h in history], linestyle="--", marker="x", alpha=0.6,
                     label=f"{name} (train)")
    for ax, title in zip(axes, ("mean Omega (share in the SG window)", "training loss (task)", "accuracy %")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def _fmt_pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def write_run_report(run_dir: Path, name: str, config: dict, history: list[dict], samples: list[dict],
                     robustness: dict | None = None, diagnostics: list[dict] | None = None,
                     test_images: int | None = None, problems: list[str] | None = None) -> dict:
    """report.json / report.md and the run's plots; ``config`` is the run's own (its eta included),
    test_images the number of test images the accuracy is over, problems what diagnostics.diagnose found
    (said at the top of report.md: the robustness figures of such a model mean nothing)."""
    run_dir = Path(run_dir)
    final = history[-1]
    eta = config["eta"]
    report = {
        "run": name, "eta": eta, "config": config, "provenance": provenance(),
        "clean_acc": final["test_acc"], "test_images": test_images, "mean_omega": final["test_omega"],
        "omega_per_layer": final["test_omega_layers"],
        "seconds_per_epoch": float(np.mean([h["epoch_seconds"] for h in history])),
        "epochs": len(history), "history": history,
        "membrane_share_in_window": [float(np.mean(np.abs(s["u"]) <= s["window"])) for s in samples],
        "robustness": robustness,
        "diagnostics": diagnostics,
        "problems": problems or [],
    }
    write_json(run_dir / "report.json", report)
    plot_membrane({name: samples}, run_dir / "membrane.png", f"{name} (eta = {eta:g})")
    plot_curves({name: history}, run_dir / "curves.png")
    lines = [
        f"# Run `{name}` (eta = {eta:g})", "",
        *([f"**Diagnosis: {'; '.join(problems)}.** The robustness figures below cannot be judged on this model "
           "(train longer: more epochs or images).", ""] if problems else []),
        f"- model {config['model']}, data {config['data']}, T = {config['T']}, encoding {config['encoding']}, "
        f"surrogate {config['surrogate']}, epochs {len(history)}",
        f"- clean test accuracy: **{_fmt_pct(report['clean_acc'])}**"
        + (f" ({test_images} test images)" if test_images else ""),
        f"- training: {_training_line(config)}",
        f"- mean Omega ({_window_line(config)}): **{report['mean_omega']:.4f}**; per layer: "
        + ", ".join(f"{o:.3f}" for o in report["omega_per_layer"]),
        f"- time per epoch: {report['seconds_per_epoch']:.1f} s", "",
        "| epoch | train loss | train acc | test acc | test Omega | s |", "|---|---|---|---|---|---|",
    ]
    lines += [f"| {h['epoch']} | {h['train_loss']:.4f} | {_fmt_pct(h['train_acc'])} | {_fmt_pct(h['test_acc'])} "
              f"| {h['test_omega']:.4f} | {h['epoch_seconds']:.1f} |" for h in history]
    lines += ["", "![membrane potential](membrane.png)", "", "![curves](curves.png)", ""]
    if diagnostics:
        lines += _diagnostics_lines({name: diagnostics})
    if robustness:
        lines += _robustness_lines({name: robustness})
    write_text(run_dir / "report.md", "\n".join(lines))
    return report


def _window_line(config: dict) -> str:
    if config.get("mpd_window") == "relative":
        return f"window of {config.get('mpd_k', 1.0):g} standard deviations, each cell's own"
    gamma = config.get("gamma")
    return f"window [-{gamma:g}, {gamma:g}]" if gamma is not None else "the surrogate's window"


def _training_line(config: dict) -> str:
    """What the run added to the cross-entropy: MPD-SGR, SR, adversarial training."""
    parts = [f"MPD-SGR eta = {config['eta']:g}" if config.get("eta") else "no MPD-SGR"]
    if config.get("sr_lambda"):
        parts.append(f"SR lambda = {config['sr_lambda']:g} (h = {config.get('sr_h', 0.01):g})")
    if config.get("adv_train"):
        parts.append(f"PGD adversarial training (eps {eps_label(config['adv_eps'])}, step "
                     f"{eps_label(config['adv_step'])}, {config['adv_steps']} steps)")
    return ", ".join(parts)


def _diagnostics_lines(diagnostics: dict[str, list[dict]]) -> list[str]:
    return ["## Membrane potential per LIF layer (test images, eval mode; train/diagnostics.py)", "",
            *diagnostics_table(diagnostics), ""]


def _robustness_lines(robustness: dict[str, dict]) -> list[str]:
    names = list(robustness)
    first = next(iter(robustness.values()))
    lines = [f"## Robustness (eps {eps_label(first['eps'])}, {first['n']} test images)", "",
             "| attack | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for attack in first["accuracy"]:
        lines.append(f"| {attack} | " + " | ".join(_fmt_pct(robustness[n]["accuracy"][attack]) for n in names) + " |")
    lines.append("| input-gradient L1 | " + " | ".join(f"{robustness[n]['grad_l1']:.4g}" for n in names) + " |")
    for n in names:
        lines += ["", f"Gradient-masking sanity checks ({n}):"]
        lines += [f"- {'PASS' if c['passed'] else '**FAIL**'} `{c['name']}`: {c['detail']}" for c in robustness[n]["checks"]]
    return lines + [""]


def write_comparison(out_dir: Path, reports: list[dict], samples: dict[str, list[dict]], note: str | None = None) -> str:
    """comparison.json / comparison.md / plots for runs trained from the same seed; returns the table text.
    note: a line for comparison.md under the table (the preset's PRESET_NOTES: what the study found)."""
    out_dir = Path(out_dir)
    names = [r["run"] for r in reports]
    rows = [("eta", [f"{r['eta']:g}" for r in reports]),
            ("clean accuracy", [_fmt_pct(r["clean_acc"]) for r in reports]),
            ("mean Omega", [f"{r['mean_omega']:.4f}" for r in reports])]
    robust = all(r.get("robustness") for r in reports)
    if robust:
        for attack in [a for a in reports[0]["robustness"]["accuracy"] if a != "clean"]:
            rows.append((f"{attack} accuracy", [_fmt_pct(r["robustness"]["accuracy"][attack]) for r in reports]))
        rows.append(("input-gradient L1", [f"{r['robustness']['grad_l1']:.4g}" for r in reports]))
        rows.append(("masking checks", ["not judged" if r.get("problems") else
                                        "pass" if r["robustness"]["checks_passed"] else "FAILED" for r in reports]))
    rows.append(("s / epoch", [f"{r['seconds_per_epoch']:.1f}" for r in reports]))
    width = max(len(k) for k, _ in rows) + 2
    col = max(12, *(len(n) + 2 for n in names))
    table = "".ljust(width) + "".join(n.rjust(col) for n in names) + "\n"
    table += "\n".join(k.ljust(width) + "".join(v.rjust(col) for v in vals) for k, vals in rows)
    diagnosed = [f"- `{r['run']}`: {'; '.join(r['problems'])}" for r in reports if r.get("problems")]
    md = ["# Plain vs MPD-SGR (same seed)", "",
          *(["**Diagnosis** (the robustness figures of these models cannot be judged):", *diagnosed, ""]
            if diagnosed else []), "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    md += [f"| {k} | " + " | ".join(vals) + " |" for k, vals in rows]
    md += ["", note] if note else []
    md += ["", "![membrane potential](membrane.png)", "", "![curves](curves.png)", ""]
    if all(r.get("diagnostics") for r in reports):
        md += _diagnostics_lines({r["run"]: r["diagnostics"] for r in reports})
    if robust:
        md += _robustness_lines({r["run"]: r["robustness"] for r in reports})
    write_text(out_dir / "comparison.md", "\n".join(md))
    write_json(out_dir / "comparison.json",
               {r["run"]: {k: r.get(k) for k in ("eta", "clean_acc", "mean_omega", "omega_per_layer",
                                                  "seconds_per_epoch", "robustness", "diagnostics")} for r in reports})
    plot_membrane(samples, out_dir / "membrane.png", "plain vs MPD-SGR")
    plot_curves({r["run"]: r["history"] for r in reports}, out_dir / "curves.png")
    return table


# ---------------------------------------------------------------- evaluations (train.eval)


def eval_table(names: list[str], results: list[dict]) -> str:
    """Plain-text table: rows = attack@eps, columns = models."""
    rows = [("clean", [_fmt_pct(r["clean"]) for r in results])]
    for attack in results[0]["accuracy"]:
        for eps in results[0]["accuracy"][attack]:
            rows.append((f"{attack} @ {eps_label(eps)}", [_fmt_pct(r["accuracy"][attack][eps]) for r in results]))
    for eps in results[0]["worst_case"]:
        rows.append((f"all attacks @ {eps_label(eps)}", [_fmt_pct(r["worst_case"][eps]) for r in results]))
    if results[0].get("large_eps"):
        large = results[0]["large_eps"]
        for attack in large.get("by_attack", {"pgd": None}):
            rows.append((f"{attack} @ eps {large['eps']:g} (check)",
                         [_fmt_pct(r["large_eps"].get("by_attack", {"pgd": r["large_eps"]["acc"]})[attack])
                          for r in results]))
    rows.append(("input-gradient L1", [f"{r['grad_l1']:.4g}" for r in results]))
    rows.append(("sanity checks", ["pass" if r["all_checks_passed"] else "FAILED" for r in results]))
    width = max(len(k) for k, _ in rows) + 2
    col = max(14, *(len(n) + 2 for n in names))
    lines = ["".ljust(width) + "".join(n.rjust(col) for n in names)]
    lines += [k.ljust(width) + "".join(v.rjust(col) for v in vals) for k, vals in rows]
    return "\n".join(lines)


def eval_markdown(names: list[str], results: list[dict], command: str,
                  diagnostics: dict[str, list[dict]] | None = None) -> str:
    md = ["# Robustness evaluation", "", f"Command: `{command}`", "", f"Images: {results[0]['n']}; settings: "
          + ", ".join(f"{k}={v}" for k, v in results[0]["settings"].items()), "",
          "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for line in eval_table(names, results).splitlines()[1:]:
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
                    md.append(f"| {attack} @ {eps_label(eps)} | "
                              + " | ".join(_fmt_pct(by_g[g]) for g in r["settings"]["gradients"]) + " |")
        levels = r["settings"].get("assg_levels", [])
        if r.get("assg_by_level") and len(levels) > 1:
            keys = list(next(iter(r["assg_by_level"].values())))
            md += ["", f"## {name}: ASSG accuracy per level (the table above is the per-image worst case)", "",
                   "| eps | " + " | ".join(f"level {k}" for k in keys) + " |", "|---|" + "---|" * len(keys)]
            for eps, by_level in r["assg_by_level"].items():
                md.append(f"| {eps_label(eps)} | " + " | ".join(_fmt_pct(by_level[k]) for k in keys) + " |")
        if r.get("first_run"):
            runs = r["settings"]["restarts"]
            md += ["", f"## {name}: the first of the {runs} runs alone (the attack without restarts)", "",
                   "| attack @ eps | first run | all runs |", "|---|---|---|"]
            for attack, by_eps in r["first_run"].items():
                for eps, acc in by_eps.items():
                    every = _fmt_pct(r["accuracy"][attack][eps])
                    md.append(f"| {attack} @ {eps_label(eps)} | {_fmt_pct(acc)} | {every} |")
        md += ["", f"## {name}: gradient-masking sanity checks", ""]
        for c in r["checks"]:
            flag = "PASS" if c["passed"] else "**FAIL**"
            md.append(f"- {flag} `{c['name']}`: {c['detail']}")
        if not r["all_checks_passed"]:
            md.append("\n> **Warning: a sanity check failed: the robust accuracies above may come from gradient "
                      "masking, not robustness. Do not report them as robustness.**")
    if diagnostics:
        md += ["", *_diagnostics_lines(diagnostics)]
    md += ["", "![robust accuracy against eps](robustness.png)", "", "![membrane potential per layer](membrane.png)", ""]
    return "\n".join(md)


@optional_plot()
def plot_robustness(names: list[str], results: list[dict], path: Path) -> None:
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
