"""The sweep's results: what each finished point measured, the settings aggregated over seeds (mean and
standard error), sweep.json / sweep.md and the plots."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from plumbing.files import optional_plot, save_figure, write_json, write_text  # noqa: E402
from plumbing.provenance import provenance  # noqa: E402

from ..config import eps_label  # noqa: E402
from ..diagnostics import DIAGNOSTICS  # noqa: E402
from .plan import SEED_KEY, Point  # noqa: E402
from .runner import POINT_FILE, _read_json, _trained_model  # noqa: E402

# ---------------------------------------------------------------- results


def point_result(point: Point, out: Path) -> dict | None:
    """What a finished point measured (report.json of its run, eval.json of its evaluation; without an
    evaluation, the one train.run ran itself at the end, if any)."""
    folder = out / "points" / point.name
    if not (folder / POINT_FILE).is_file():
        return None
    model = _trained_model(folder)
    report = _read_json(model.parent / "report.json") if model else None
    if report is None:
        return None
    result = {"point": point.name, "setting": point.setting, "case": point.case, "values": point.values,
              "clean_acc": report["clean_acc"], "test_images": report.get("test_images"), "mean_omega": report["mean_omega"],
              "omega_per_layer": report["omega_per_layer"], "seconds_per_epoch": report["seconds_per_epoch"],
              "epochs": report["epochs"], "diagnostics": report.get("diagnostics"), "robust": {}}
    evaluation = _read_json(folder / "eval" / "eval.json")
    if evaluation and point.name in evaluation.get("models", {}):
        r = evaluation["models"][point.name]
        result.update(eval_images=r["n"], eval_clean=r["clean"], grad_l1=r["grad_l1"],
                      checks_passed=r["all_checks_passed"],
                      failed_checks=[c["name"] for c in r["checks"] if not c["passed"]])
        for attack, by_eps in r["accuracy"].items():
            for eps, acc in by_eps.items():
                result["robust"][f"{attack} @ {eps_label(eps)}"] = acc
        for eps, acc in r["worst_case"].items():
            result["robust"][f"all attacks @ {eps_label(eps)}"] = acc
    elif report.get("robustness"):  # no --eval-args: train.run's own evaluation (--eval-attacks, one eps)
        r = report["robustness"]
        eps = eps_label(r["eps"])
        result.update(eval_images=r["n"], eval_clean=r["accuracy"].get("clean"), grad_l1=r["grad_l1"],
                      checks_passed=r["checks_passed"], failed_checks=[c["name"] for c in r["checks"] if not c["passed"]])
        for attack, acc in r["accuracy"].items():
            if attack != "clean":
                result["robust"][f"{attack} @ {eps}"] = acc
    return result


def mean_se(values: list[float], n_images: int | None) -> tuple[float, float, str]:
    """(mean, standard error, what the error is over): over seeds when there are several, else
    the binomial error over the images."""
    mean = sum(values) / len(values)
    if len(values) > 1:
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
        return mean, math.sqrt(var / len(values)), "seeds"
    if n_images:
        return mean, math.sqrt(max(mean * (1 - mean), 0.0) / n_images), "images"
    return mean, float("nan"), "-"


def summarize(points: list[Point], out: Path) -> dict:
    """sweep.json's content: every finished point, and each setting aggregated over its seeds."""
    results = [r for r in (point_result(p, out) for p in points) if r is not None]
    settings: dict[str, list[dict]] = {}
    for r in results:
        settings.setdefault(r["setting"], []).append(r)
    groups = []
    for setting, rs in settings.items():
        test_images = rs[0].get("test_images")
        eval_images = rs[0].get("eval_images")
        group = {"setting": setting, "case": rs[0]["case"],
                 "values": {k: v for k, v in rs[0]["values"].items() if k != SEED_KEY},
                 "seeds": [r["values"].get(SEED_KEY) for r in rs], "n": len(rs), "metrics": {}}
        group["metrics"]["clean"] = mean_se([r["clean_acc"] for r in rs], test_images)
        group["metrics"]["mean Omega"] = mean_se([r["mean_omega"] for r in rs], None)
        for key in rs[0]["robust"]:
            if all(key in r["robust"] for r in rs):
                group["metrics"][key] = mean_se([r["robust"][key] for r in rs], eval_images)
        if all("grad_l1" in r for r in rs):
            group["metrics"]["input-gradient L1"] = mean_se([r["grad_l1"] for r in rs], None)
        if all(r.get("diagnostics") for r in rs):
            n_layers = len(rs[0]["diagnostics"])
            group["diagnostics"] = [{key: sum(r["diagnostics"][i][key] for r in rs) / len(rs) for key in DIAGNOSTICS}
                                    | {"layer": i + 1, "window": rs[0]["diagnostics"][i]["window"]}
                                    for i in range(n_layers)]
        group["checks_passed"] = all(r.get("checks_passed", True) for r in rs)
        groups.append(group)
    return {"points": results, "settings": groups}


def _pm(metric: tuple[float, float, str], percent: bool = True) -> str:
    mean, se, _ = metric
    scale = 100 if percent else 1
    if math.isnan(se):
        return f"{scale * mean:.2f}"
    return f"{scale * mean:.2f} ± {scale * se:.2f}"


def markdown(summary: dict, command: str, curve: str | None = None) -> str:
    lines = ["# Sweep", "", f"Command: `{command}`", "",
             "Accuracies in %, mean ± standard error: over seeds where a setting has several, else over the "
             "test images (binomial). Robust accuracy counts an image only if it is right both clean and attacked; "
             "\"all attacks\" is the per-image worst case over every attack train.eval (or, without --eval-args, "
             "train.run's own evaluation) ran.", ""]
    groups = summary["settings"]
    if not groups:
        return "\n".join(lines + ["No point has finished yet."])
    keys = list(dict.fromkeys(k for g in groups for k in g["metrics"]))
    lines += ["| setting | seeds | " + " | ".join(keys) + " | checks |", "|---|---|" + "---|" * (len(keys) + 1)]
    for g in groups:
        cells = [(_pm(g["metrics"][k], percent=k not in ("mean Omega", "input-gradient L1"))
                  if k in g["metrics"] else "-") for k in keys]
        lines.append(f"| {g['setting']} | {g['n']} | " + " | ".join(cells) + " | "
                     + ("pass" if g["checks_passed"] else "**FAIL**") + " |")
    if any(g.get("diagnostics") for g in groups):
        lines += ["", "## Membrane potential per LIF layer (test images, eval mode; mean over seeds)", "",
                  "| setting | layer | window | " + " | ".join(t for t, _ in DIAGNOSTICS.values()) + " |",
                  "|---|---|---|" + "---|" * len(DIAGNOSTICS)]
        for g in groups:
            for d in g.get("diagnostics") or []:
                window = d["window"] if isinstance(d["window"], str) else f"{d['window']:.3g}"
                lines.append(f"| {g['setting']} | {d['layer']} | {window} | "
                             + " | ".join(fmt.format(d[k]) for k, (_, fmt) in DIAGNOSTICS.items()) + " |")
    lines += ["", "## Points", "", "| point | clean | mean Omega | s / epoch | epochs | checks |",
              "|---|---|---|---|---|---|"]
    for r in summary["points"]:
        checks = "-" if "checks_passed" not in r else ("pass" if r["checks_passed"] else
                                                     "**FAIL** " + ", ".join(r["failed_checks"]))
        lines.append(f"| {r['point']} | {100 * r['clean_acc']:.2f} | {r['mean_omega']:.4f} | "
                     f"{r['seconds_per_epoch']:.1f} | {r['epochs']} | {checks} |")
    lines += ["", "![clean against robust accuracy](sweep.png)", ""]
    if curve is not None:
        lines += [f"![accuracy against {curve}](sweep_{curve}.png)", ""]
    return "\n".join(lines)


@optional_plot()
def plot(summary: dict, path: Path) -> None:
    """Clean accuracy (x) against robust accuracy (y), one panel per attack @ eps, error bars."""
    groups = summary["settings"]
    panels = list(dict.fromkeys(k for g in groups for k in g["metrics"] if "@" in k))
    if not panels:
        return
    panels.sort(key=_panel_order)
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.3 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {g["setting"]: colors[i % len(colors)] for i, g in enumerate(groups)}  # one colour per setting
    for ax, key in zip(axes.flat, panels):
        for g in (g for g in groups if key in g["metrics"]):
            cx, sx, _ = g["metrics"]["clean"]
            ry, sy, _ = g["metrics"][key]
            ax.errorbar(100 * cx, 100 * ry, xerr=None if math.isnan(sx) else 100 * sx,
                        yerr=None if math.isnan(sy) else 100 * sy, fmt="o", color=color[g["setting"]],
                        label=g["setting"], capsize=2, markersize=4)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("clean accuracy %", fontsize=8)
        ax.set_ylabel("robust accuracy %", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    # the legend names every setting (not only those of the first panel), below the panels
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=color[g["setting"]], markersize=4) for g in groups]
    ncol = min(4, max(1, len(groups)))
    fig.legend(handles, [g["setting"] for g in groups], loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    legend_inches = 0.2 * math.ceil(len(groups) / ncol) + 0.1
    fig.tight_layout(rect=(0, min(0.3, legend_inches / fig.get_figheight()), 1, 1))
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def _panel_order(key: str):
    """'all attacks @ eps' first, then by eps (smallest first), then by attack."""
    attack, _, eps = key.partition(" @ ")
    value = float(eps[:-4]) / 255 if eps.endswith("/255") else float(eps)
    return (attack != "all attacks", value, attack)


def numeric_key(summary: dict) -> str | None:
    """The one grid key (other than the seed) that varies over the settings, if all its values are
    numbers (eta, sr-lambda, ...): the sweep is then a curve over it."""
    groups = summary["settings"]
    if len(groups) < 2 or any(g["case"] is not None for g in groups):
        return None
    keys = [k for k in groups[0]["values"] if len({g["values"].get(k) for g in groups}) > 1]
    if len(keys) != 1:
        return None
    try:
        [float(g["values"][keys[0]]) for g in groups]
    except (KeyError, ValueError):
        return None
    return keys[0]


@optional_plot()
def plot_curve(summary: dict, key: str, path: Path) -> None:
    """Clean and robust accuracy (each attack @ eps, and the worst case) against a numeric grid key,
    one panel per eps, with error bars; a log axis when the values span a factor of 10 or more (the
    smallest, when 0, drawn one step below the next)."""
    groups = sorted(summary["settings"], key=lambda g: float(g["values"][key]))
    xs = [float(g["values"][key]) for g in groups]
    positive = sorted(x for x in xs if x > 0)
    log = len(positive) >= 2 and positive[-1] / positive[0] >= 10
    zero_at = positive[0] / (positive[1] / positive[0]) if log else None
    plot_xs = [x if x > 0 or not log else zero_at for x in xs]
    metrics = list(dict.fromkeys(m for g in groups for m in g["metrics"] if "@" in m))
    eps_list = sorted({m.partition(" @ ")[2] for m in metrics}, key=lambda e: _panel_order(f"x @ {e}")[1])
    fig, axes = plt.subplots(1, len(eps_list), figsize=(4.6 * len(eps_list), 3.6), squeeze=False)
    for ax, eps in zip(axes.flat, eps_list):
        curves = [("clean", "clean")] + [(m.partition(" @ ")[0], m) for m in sorted(metrics, key=_panel_order)
                                          if m.endswith(f"@ {eps}")]
        for label, metric in curves:
            ys = [100 * g["metrics"][metric][0] if metric in g["metrics"] else math.nan for g in groups]
            errs = [100 * g["metrics"][metric][1] if metric in g["metrics"] else math.nan for g in groups]
            style = dict(linewidth=2.2, color="k") if label == "all attacks" else {}
            ax.errorbar(plot_xs, ys, yerr=[0 if math.isnan(e) else e for e in errs], marker="o", markersize=3.5,
                        capsize=2, label=label, **style)
        if log:
            ax.set_xscale("log")
            if zero_at is not None and 0.0 in xs:
                ticks = [zero_at] + positive
                ax.set_xticks(ticks, ["0"] + [f"{t:g}" for t in positive])
        ax.set_title(f"eps {eps}", fontsize=10)
        ax.set_xlabel(key, fontsize=9)
        ax.set_ylabel("accuracy %", fontsize=9)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def write_summary(points: list[Point], out: Path, command: str) -> dict:
    summary = summarize(points, out)
    write_json(out / "sweep.json", {"command": command, "provenance": provenance(), **summary})
    key = numeric_key(summary)
    write_text(out / "sweep.md", markdown(summary, command, curve=key))
    plot(summary, out / "sweep.png")
    if key is not None:
        plot_curve(summary, key, out / f"sweep_{key}.png")
    return summary


