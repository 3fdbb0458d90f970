#!/usr/bin/env bash
# The Fashion-MNIST study behind docs/RESULTS.md, on real data and CPU:
#   main   one teacher, then the same thin deep student four ways (scratch, KD, FitNets two-stage,
#          FitNets single-stage joint), 1400 steps each, for every seed in SEEDS;
#   depth  students of 3 to 15 conv layers at about the same multiply-accumulates (~11M per
#          image), each trained from scratch, with KD and with FitNets two-stage (one seed);
#   nobn   the same depth study without BatchNorm, as in the FitNets paper's networks, at lr 0.01
#          (at the other parts' 0.05, distillation diverged on these students);
#   ensemble  three teachers (seeds 0, 1, 2), each and as an ensemble (`fitdist eval --teachers`),
#          then the main study's student from scratch, with KD from the best single teacher, with
#          KD from the ensemble and with FitNets (hints from one member, KD from the ensemble);
#   collapse  the no-BatchNorm 15-layer FitNets collapse, one factor changed per run, diagnostics on
#          (seed 0, 300 hint + 500 KD steps);
#   regime thin students without BatchNorm, 11 to 23 conv layers at ~11M MACs, scratch / KD /
#          FitNets (REGIME_AIDS: key=value words added to every run, e.g. the init and clipping;
#          REGIME_DIR: its folder under OUT, default regime; REGIME_DEPTHS; REGIME_SEEDS, default 0);
#   stored KD from stored soft labels (`fitdist label`, R = 10, k = 10) against online KD on the
#          same Fashion-MNIST shards;
#   report `fitdist report` over each part: plots and results.md (mean ± std over seeds).
#   bash launch/fmnist_study.sh [main|depth|nobn|ensemble|collapse|regime|stored|report|all]
#   (default: all = main, depth, nobn, ensemble, then report)
# Environment: VENV (default .venv, created if missing), OUT (default runs/study), SEEDS (default
# "0 1 2"), DEPTHS (default "3 6 9 12 15"). A finished run (summary.json present) is kept; an
# interrupted one resumes; one that another live process of this script is training is skipped,
# so two processes (one per core) can run the same part side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x "${VENV:-.venv}/bin/fitdist" ]; then source launch/setup.sh; fi
VENV="${VENV:-.venv}"
OUT="${OUT:-runs/study}"
SEEDS="${SEEDS:-0 1 2}"
DEPTHS="${DEPTHS:-3 6 9 12 15}"
for depth in $DEPTHS; do
  case $depth in 3 | 6 | 9 | 12 | 15) ;; *) echo "DEPTHS: $depth is not one of 3 6 9 12 15" >&2; exit 2 ;; esac
done
CONFIGS=fitdist/configs
TEACHER="$OUT/teacher/student.pt"
export WANDB_MODE="${WANDB_MODE:-offline}"

run() {  # run DIR CONFIG [key=value ...]: train unless DIR already holds a finished run
  local dir=$1 config=$2
  shift 2
  case $config in
    *-ensemble.yaml) set -- "teachers.0.weights=$TEACHER" "teachers.1.weights=$OUT/ensemble/teacher-s1/student.pt" \
      "teachers.2.weights=$OUT/ensemble/teacher-s2/student.pt" "$@" ;;
    *-kd.yaml | *-fitnets*.yaml) set -- "teacher.weights=${TEACHER_WEIGHTS:-$TEACHER}" "$@" ;;
  esac
  if [ -f "$dir/summary.json" ]; then echo "finished: $dir"; return; fi
  # a run another live process of this script is training is left to it (two processes can share a part)
  local lock="$dir.lock"
  if [ -f "$lock" ] && kill -0 "$(cat "$lock")" 2>/dev/null; then echo "running in process $(cat "$lock"): $dir"; return; fi
  mkdir -p "$(dirname "$dir")" && echo $$ >"$lock"
  echo "+ fitdist train $config run.dir=$dir $*"
  "$VENV/bin/fitdist" train "$config" "run.dir=$dir" run.resume=auto "$@"
  rm -f "$lock"
}

teacher() {
  run "$OUT/teacher" "$CONFIGS/fmnist-teacher.yaml"
}

main_study() {
  teacher
  for seed in $SEEDS; do
    for method in scratch kd fitnets fitnets-joint; do
      run "$OUT/main/$method-s$seed" "$CONFIGS/fmnist-$method.yaml" "seed=$seed"
    done
  done
}

ensemble_study() {  # three teachers (seeds 0, 1, 2), then the main study's student four ways
  teacher
  local s seed best
  for s in 1 2; do run "$OUT/ensemble/teacher-s$s" "$CONFIGS/fmnist-teacher.yaml" "seed=$s"; done
  if [ ! -s "$OUT/ensemble/teachers.json" ]; then  # each teacher and the ensemble, on the test split
    "$VENV/bin/fitdist" eval --teachers "$CONFIGS/fmnist-kd-ensemble.yaml" "teachers.0.weights=$TEACHER" \
      "teachers.1.weights=$OUT/ensemble/teacher-s1/student.pt" "teachers.2.weights=$OUT/ensemble/teacher-s2/student.pt" \
      >"$OUT/ensemble/teachers.json.tmp"
    mv "$OUT/ensemble/teachers.json.tmp" "$OUT/ensemble/teachers.json"
  fi
  best=$("$VENV/bin/python" -c 'import json, sys; runs = sys.argv[1:]
print(max(runs, key=lambda r: json.load(open(r + "/summary.json"))["val/top1"]))' \
    "$OUT/teacher" "$OUT/ensemble/teacher-s1" "$OUT/ensemble/teacher-s2")
  echo "best single teacher: $best"
  for seed in $SEEDS; do  # the rows of Hinton's claim first
    TEACHER_WEIGHTS="$best/student.pt" run "$OUT/ensemble/kd-best-s$seed" "$CONFIGS/fmnist-kd.yaml" "seed=$seed" \
      name=fmnist-kd-best
    run "$OUT/ensemble/kd-ensemble-s$seed" "$CONFIGS/fmnist-kd-ensemble.yaml" "seed=$seed"
  done
  for seed in $SEEDS; do
    run "$OUT/ensemble/fitnets-ensemble-s$seed" "$CONFIGS/fmnist-fitnets-ensemble.yaml" "seed=$seed"
    run "$OUT/ensemble/scratch-s$seed" "$CONFIGS/fmnist-scratch.yaml" "seed=$seed"
  done
}

depth_student() {  # depth_student K: 3K conv layers, widths w, 2w, 3w per third, ~11M MACs
  local k=$1 w
  case $k in 1) w=42 ;; 2) w=21 ;; 3) w=16 ;; 4) w=14 ;; 5) w=12 ;; esac
  local widths="" i
  for i in $(seq "$k"); do widths="$widths,$w"; done
  for i in $(seq "$k"); do widths="$widths,$((2 * w))"; done
  for i in $(seq "$k"); do widths="$widths,$((3 * w))"; done
  # pooling closes the first two thirds; the guided layer ends the second (7x7, as teacher conv2)
  echo "student.kwargs.widths=[${widths#,}] student.kwargs.pool_after=[$k,$((2 * k))]" \
    "hints.0.student=conv$((2 * k))"
}

depth_study() {  # depth_study DIR [key=value ...]: the depth study, overrides on every student
  local dir=$1 depth k method overrides
  shift
  teacher
  for depth in $DEPTHS; do
    k=$((depth / 3))
    read -r -a overrides <<<"$(depth_student "$k")"
    for method in scratch kd fitnets; do
      local extra=("${overrides[@]}")
      [ "$method" = fitnets ] || extra=("${overrides[@]:0:2}")  # only FitNets has a hint
      run "$OUT/$dir/d$depth-$method" "$CONFIGS/fmnist-$method.yaml" \
        "name=$dir$depth-$method" "${extra[@]}" "$@"
    done
  done
}

collapse_study() {  # the no-BatchNorm 15-layer FitNets collapse: one factor changed per run (seed 0),
  # at a shorter budget than the other parts (300 hint + 500 KD steps): the collapse shows in the first KD steps
  teacher
  local nobn=(student.kwargs.batch_norm=false optim.lr=0.01 train.diagnostics=true stages.1.steps=500)
  read -r -a nobn15 <<<"$(depth_student 5)"
  local name factor
  while read -r name factor; do
    # shellcheck disable=SC2086  # a factor is zero or more key=value words
    run "$OUT/collapse/$name" "$CONFIGS/fmnist-fitnets.yaml" "name=collapse-$name" "${nobn15[@]}" "${nobn[@]}" $factor
  done <<'EOF_FACTORS'
base
clip1 optim.max_grad_norm=1
control-lr0 stages.0.optim.lr=0
lambda1 stages.1.kd=1.0
ce-only stages.1.kd=0
maxnorm2 optim.max_norm=2
lr0.003 stages.1.optim.lr=0.003
regressor-linear hints.0.relu=false
lr0.001 stages.1.optim.lr=0.001
maxnorm1.5 optim.max_norm=1.5
EOF_FACTORS
}

regime_student() {  # regime_student D: D conv layers in thirds a, a, D - 2a (a = round(D/3)), ~11M MACs
  local d=$1 a w widths="" i
  a=$(((d + 1) / 3))
  case $d in 11) w=14 ;; 15) w=12 ;; 19) w=10 ;; 23) w=9 ;; *) echo "regime depth $d: one of 11 15 19 23" >&2; exit 2 ;; esac
  for i in $(seq "$a"); do widths="$widths,$w"; done
  for i in $(seq "$a"); do widths="$widths,$((2 * w))"; done
  for i in $(seq $((d - 2 * a))); do widths="$widths,$((3 * w))"; done
  echo "student.kwargs.widths=[${widths#,}] student.kwargs.pool_after=[$a,$((2 * a))] hints.0.student=conv$((2 * a))"
}

regime_study() {  # thin students without BatchNorm, 11 to 23 conv layers, scratch / KD / FitNets
  teacher
  local depth method overrides aids seed dir="$OUT/${REGIME_DIR:-regime}"
  read -r -a aids <<<"${REGIME_AIDS:-}"
  for seed in ${REGIME_SEEDS:-0}; do
    for depth in ${REGIME_DEPTHS:-11 15 19 23}; do
      read -r -a overrides <<<"$(regime_student "$depth")"
      for method in scratch kd fitnets; do
        local extra=("${overrides[@]}")
        [ "$method" = fitnets ] || extra=("${overrides[@]:0:2}")
        run "$dir/d$depth-$method-s$seed" "$CONFIGS/fmnist-$method.yaml" "name=regime$depth-$method" "seed=$seed" \
          "${extra[@]}" student.kwargs.batch_norm=false optim.lr=0.01 train.diagnostics=true "${aids[@]}"
      done
    done
  done
}

stored_study() {  # KD from stored soft labels (fitdist label) against online KD, on the same shards
  teacher
  local shards="$OUT/stored/shards" labels="$OUT/stored/labels-r10-k10" seed
  local wds=(data.source=webdataset "data.root=$shards" data.augment=light)
  if [ ! -f "$shards/manifest.json" ]; then "$VENV/bin/fitdist" shard fashion-mnist "$shards" --shard-size 10000; fi
  "$VENV/bin/fitdist" label "$CONFIGS/fmnist-kd.yaml" "teacher.weights=$TEACHER" "${wds[@]}" \
    "data.soft_labels=$labels" --views 10 --topk 10 --no-progress  # resumes: finished shards are kept
  for seed in $SEEDS; do
    run "$OUT/stored/online-kd-s$seed" "$CONFIGS/fmnist-kd.yaml" "seed=$seed" name=fmnist-kd-online "${wds[@]}"
    run "$OUT/stored/stored-kd-s$seed" "$CONFIGS/fmnist-kd.yaml" "seed=$seed" name=fmnist-kd-stored "${wds[@]}" \
      "data.soft_labels=$labels"
  done
}

report() {
  "$VENV/bin/fitdist" report "$OUT/teacher" "$OUT"/main/* --out "$OUT/report-main"
  local dir
  for dir in "$OUT"/{depth,nobn,ensemble,collapse,stored} "$OUT"/regime*; do
    if [ -d "$dir" ]; then "$VENV/bin/fitdist" report "$dir"/* --out "$OUT/report-${dir##*/}"; fi
  done
}

case "${1:-all}" in
  main) main_study ;;
  depth) depth_study depth ;;
  nobn) depth_study nobn student.kwargs.batch_norm=false optim.lr=0.01 ;;
  ensemble) ensemble_study ;;
  collapse) collapse_study ;;
  regime) regime_study ;;
  stored) stored_study ;;
  report) report ;;
  all) main_study; depth_study depth; depth_study nobn student.kwargs.batch_norm=false optim.lr=0.01; ensemble_study
    report ;;
  *) echo "usage: bash launch/fmnist_study.sh [main|depth|nobn|ensemble|collapse|regime|stored|report|all]" >&2
    exit 2 ;;
esac
