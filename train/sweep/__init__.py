"""python -m train.sweep: a grid of train.run (and train.eval) runs, one after another, resumable.

    python -m train.sweep --out runs/eta-sweep --train-args "--preset study --epochs 15" \\
        --grid eta=0,0.01,0.1,1 --grid seed=0,1,2 \\
        --eval-args "--attacks fgsm,pgd,apgd --ensemble --eps 8/255,0.1 --limit 1000"
    # named settings instead of (or crossed with) a grid: each --case is a label and train.run flags
    python -m train.sweep --out runs/baselines --train-args "--preset study" --grid seed=0,1,2 \\
        --case plain="--eta 0" --case mpd="--eta 0.1" --case sr="--eta 0 --sr-lambda 0.01"

A point is one setting: a --case (if any) crossed with one value of every --grid key (a
train.run option, written as its flag without the dashes: eta, seed, model, adv-train, ...;
on/off for a switch). Each point trains one model with ``python -m train.run <train-args>
<case> <grid values> --no-compare --out OUT/points/<point>``, then, with --eval-args,
evaluates it with ``python -m train.eval --checkpoint .../model.pt <eval-args> --out
OUT/points/<point>/eval``; without --eval-args the summary takes the evaluation train.run ran
itself at the end (its --eval-attacks at --eval-eps, e.g. the quick preset's). Both run as child processes; their output goes to
``train.log`` / ``eval.log`` in the point's folder and, line by line, to this terminal.

Nothing is lost when the sweep is interrupted (Ctrl-C, or SIGTERM: ``kill`` for a sweep in the
background, which ignores Ctrl-C's SIGINT): a finished point (``point.json``) is not
run again, an interrupted training continues with train.run --resume from its last epoch and
an interrupted evaluation with train.eval --resume from its last batch; run the same command
again. A point that failed (``failed.json``: its command and error) is not retried unless
--retry-failed. Adding values to a grid adds points and keeps the finished ones; a point
whose folder was made with other commands is refused.

Outputs in OUT: ``sweep.json`` (every point's settings, accuracies, Omega and per-layer
diagnostics, and the settings aggregated over seeds: mean and standard error), ``sweep.md``
(the tables) and ``sweep.png`` (clean accuracy against robust accuracy, for every attack
and eps that train.eval ran and for the per-image worst case over all of them, with
standard errors over seeds; over the test images where a setting has one seed); when one
numeric grid key varies (eta, sr-lambda, ...), ``sweep_<key>.png``: every accuracy against it.

The package by job: ``plan`` (grid, cases, points), ``runner`` (a point's child processes, its
records, resuming), ``summary`` (results over seeds, the files and plots), ``cli`` (the command line).
"""

from .cli import main
from .plan import SEED_KEY, Point, SweepError, parse_cases, parse_grid, plan_points
from .runner import (
           FAILED_FILE,
           PLAN_FILE,
           POINT_FILE,
           Runner,
           check_plan,
           planned_commands,
           run_point,
)
from .summary import (
           markdown,
           mean_se,
           numeric_key,
           plot,
           plot_curve,
           point_result,
           summarize,
           write_summary,
)

__all__ = ["Point", "Runner", "SweepError", "plan_points", "parse_grid", "parse_cases", "run_point", "check_plan",
           "planned_commands", "point_result", "summarize", "markdown", "plot", "plot_curve", "numeric_key",
           "write_summary", "mean_se", "main", "SEED_KEY", "POINT_FILE", "FAILED_FILE", "PLAN_FILE"]
