#!/usr/bin/env bash
# The study's lost runs, trained again with their commands (issue #30, item 3), then the attack-validity
# study (item 2), in the order they are needed. Resumable: run it again after any interruption and each
# sweep continues where it stopped (finished points are never run again). After each sweep,
# docs/study/land.py copies what finished into docs/study/models/ and docs/study/data/: commit it at once.
#
#   bash docs/study/retrain.sh            # everything left, two one-thread runs at a time
#   bash docs/study/retrain.sh at2        # only the adversarially trained pair (also: eta, sr, paper, at01, validity)
#
# About 60 minutes per pair of models on a 2-core CPU; the validity study is far longer (docs/study/README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
OUT=runs/study/retrain
EVAL="--attacks fgsm,pgd,apgd --eps 8/255,0.1 --gradients own,atan --limit 1000"
what=${1:-all}

sweep() {  # sweep NAME ARGS...: one sweep of the study preset, then land what it finished
    local name=$1; shift
    "$PY" -m train.sweep --out "$OUT/$name" --jobs 2 --threads 1 --quiet \
        --train-args "--preset study --eval-attacks ''" --eval-args "$EVAL" "$@"
    "$PY" docs/study/land.py "$OUT/$name"
}

if [[ $what == all || $what == at2 ]]; then  # section 5: the adversarially trained pair at 2/255, one sweep per seed
    for s in 0 1 2; do
        sweep "at2_seed$s" --grid seed=$s --case at2="--eta 0 --adv-train" --case at2+mpd="--eta 1 --adv-train"
    done
fi
if [[ $what == all || $what == eta ]]; then  # section 2: plain against MPD-SGR at eta = 1, three seeds
    for s in 0 1 2; do
        sweep "eta_seed$s" --grid eta=0,1 --grid seed=$s
    done
fi
if [[ $what == all || $what == sr ]]; then  # section 5: SR (lambda = 0.01), seed 0
    sweep sr_seed0 --grid seed=0 --case sr0.01="--eta 0 --sr-lambda 0.01"
fi
if [[ $what == all || $what == paper ]]; then  # table 2: seed 0's five models under the paper's protocol, and ASSG
    M=docs/study/models/2026-12-07; D=docs/study/data/2026-12-07/seed0
    five=(--checkpoint $M/eta_seed0/eta0_seed0/model.pt --checkpoint $M/sr_seed0/sr0.01_seed0/model.pt
          --checkpoint $M/eta_seed0/eta1_seed0/model.pt --checkpoint $M/at2_seed0/at2_seed0/model.pt
          --checkpoint $M/at2_seed0/at2+mpd_seed0/model.pt --name plain --name sr --name mpd --name at2 --name at2+mpd)
    evaluate() {  # evaluate NAME ARGS...: one train.eval, resumable, its result copied to $D/NAME.json once
        local name=$1; shift
        [[ -f $D/$name.json ]] && return 0
        local out=runs/study/retrain/seed0/$name resume=()
        [[ -f $out/eval.json ]] && resume=(--resume)
        "$PY" -m train.eval "$@" --out "$out" "${resume[@]}"
        mkdir -p "$D"; cp "$out/eval.json" "$D/$name.json"; cp "$out/eval.md" "$D/$name.md"
        echo "landed $D/$name.json: commit it"
    }
    evaluate paper10k "${five[@]}" --attacks fgsm,pgd,bim --eps 8/255,0.1 --limit 0
    evaluate assg "${five[@]:0:6}" --name plain --name sr --name mpd --attacks fgsm,assg \
        --assg-level 0.35,0.425,0.49 --sapgd-steps 100 --eps 8/255 --limit 1000
fi
if [[ $what == all || $what == at01 ]]; then  # table 4: AT at eps 0.1, seeds 0-7 (models lost), the command of seeds 3-4
    for s in 0 1 2 3 4 5 6 7; do
        "$PY" -m train.sweep --out "$OUT/at0.1_seed$s" --jobs 2 --threads 1 --quiet \
            --train-args "--preset study --eval-attacks ''" --grid seed=$s \
            --case at0.1="--eta 0 --adv-train --adv-eps 0.1 --adv-step 0.05" \
            --case at0.1+mpd="--eta 1 --adv-train --adv-eps 0.1 --adv-step 0.05" \
            --eval-args "--attacks fgsm,pgd,apgd,assg --gradients own,atan --assg-level 0.35,0.425,0.49 --eps 8/255,0.1 --limit 250"
        "$PY" docs/study/land.py "$OUT/at0.1_seed$s"
    done
fi
if [[ $what == all || $what == validity ]]; then  # item 2, on the retrained AT 2/255 pair
    "$PY" docs/study/validity.py run --jobs 2
fi
