"""docs/study/log.md, section 5, "Seeds 3 and 4": the five-seed summary of adversarial training at eps 0.1
(mean ± standard error over seeds, the paired difference, a one-sided Fisher exact test of the counts of
false-robust runs) and its figure, study_at01_seeds.png. The figures are the tables' own (seeds 0-2: 500
images, seeds 3-4: 250). Run: python docs/study/figures/at01_five_seeds.py"""
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root, for train
from train.stats import fisher_one_sided  # noqa: E402
from train.sweep import mean_se  # noqa: E402  (the sweep's mean and standard error over seeds)

AT = [43.4, 81.0, 39.0, 41.6, 64.8]  # worst case over every attack at 8/255 (%), seeds 0-4
MPD = [79.0, 80.8, 80.6, 81.2, 81.6]
FALSE_ROBUST = [True, False, True, True, False]  # the plain runs, by the rule fixed before seeds 3-4; no MPD-SGR run is


diff = [b - a for a, b in zip(AT, MPD)]
(at, at_se, _), (mpd, mpd_se, _), (d, d_se, _) = (mean_se(x, None) for x in (AT, MPD, diff))
print(f"AT {at:.1f} ± {at_se:.1f}%, AT + MPD-SGR {mpd:.1f} ± {mpd_se:.1f}%, "
      f"paired {d:+.1f} ± {d_se:.1f} points ({', '.join(f'{x:+.1f}' for x in diff)})")
print(f"false-robust {sum(FALSE_ROBUST)} of {len(AT)} against 0 of {len(MPD)}: "
      f"one-sided Fisher p = {fisher_one_sided(sum(FALSE_ROBUST), 0, len(AT)):.3f}")

fig, ax = plt.subplots(figsize=(4.8, 4))
for seed, (a, m, bad) in enumerate(zip(AT, MPD, FALSE_ROBUST)):
    ax.plot([0, 1], [a, m], color="0.7", zorder=1)
    ax.scatter([0], [a], color="tab:red" if bad else "tab:blue", zorder=2)
    ax.scatter([1], [m], color="tab:blue", zorder=2)
    ax.annotate(f"seed {seed}", (0, a), xytext=(-8, 0), textcoords="offset points", ha="right", va="center",
                fontsize=8)
ax.set_xticks([0, 1], ["AT (eps 0.1)", "AT + MPD-SGR"])
ax.set_xlim(-0.6, 1.3)
ax.set_ylabel("worst case over every attack, 8/255 (%)")
ax.set_title("Five seeds; red: false-robust by the rule", fontsize=10)
fig.tight_layout()
fig.savefig(Path(__file__).with_suffix(".png"), dpi=120)
