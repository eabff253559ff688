#!/usr/bin/env bash
# Issue 32's 20-epoch study, one method and recipe per process so it can span sessions and
# machines. One method and recipe takes 0.5-2 hours on 2 CPU cores; run two at a time on 2
# cores. Every command resumes from its checkpoints, and every finished method is recorded
# in results/ledger (commit it), so a later session or machine reuses it.
#
# 1. The recipe search on the validation split (5,000 training images held out): every method
#    of the comparison under each recipe of RECIPES, AWN's four points only, chosen by the
#    mean validation accuracy over all methods' levels (compare.RECIPE_RULE).
#      scripts/recipes_20ep.sh plan                       what is recorded, left or still to train
#      scripts/recipes_20ep.sh run RECIPE:METHOD [...]    train those, one after the other
#      scripts/recipes_20ep.sh choose                     RUNS/recipes.{json,md,png}; refused until plan has nothing left
# 2. The comparison on the chosen recipe: all 60,000 training images, the test split, in
#    RUNS/final_RECIPE.
# Both train AWN's four MAC points only (no extra budgets): the recipe is chosen for those
# levels (under the SGD recipes' summed loss, six exits would push the shared weights harder
# than the search did), and the MACs to reach a level are every method's cost of stepping
# through the same four subnets.
#      scripts/recipes_20ep.sh final-plan RECIPE          what is recorded, left or still to train
#      scripts/recipes_20ep.sh final RECIPE METHOD [...]  train those, one after the other
#      scripts/recipes_20ep.sh final RECIPE               RUNS/final_RECIPE/compare.{json,md,png}; refused until final-plan has nothing left
#    SEEDS=1 before any of them runs seed 1 instead (SEEDS=0,1,2: the mean and spread of three), in
#    RUNS/final_RECIPE_seeds. METHODS=a,b before final-plan or the report narrows them to those
#    methods (e.g. the ones every seed has finished).
#
# RUNS (default runs/recipes_20ep, relative to the repository) holds the run directories.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/recipes_20ep}
RECIPES=common,published_torch,sgd_cosine_1e-4_torch,sgd_cosine_5e-4_torch
METHODS=${METHODS:-steppingnet,awn,awn_sandwich,slimmable,independent}
# XLA:CPU trains ~1.4x faster with large freed blocks kept in the heap (scripts/main.sh).
export MALLOC_ARENA_MAX=${MALLOC_ARENA_MAX:-1} MALLOC_MMAP_MAX_=${MALLOC_MMAP_MAX_:-0} \
       MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-100000000000}

twenty_epochs() {
  .venv/bin/python -m stepnet_jax.compare --config configs/compare_fashion_mnist.py \
    --config.common.train.num_epochs=20 --config.common.train.checkpoint_every_steps=200 \
    --config.extra_budgets= --config.ledger=results/ledger "$@"
}
search() { twenty_epochs --config.common.data.validation_examples=5000 "$@"; }
# The final comparison also judges SteppingNet against AWN on its own published recipe (issue 32).
# With SEEDS (e.g. SEEDS=1, or SEEDS=0,1,2 for the report) it runs those seeds in
# RUNS/final_RECIPE_seeds/seedS; seed 0 comes from the ledger entries of RUNS/final_RECIPE.
final() {
  twenty_epochs --workdir "$(final_dir "$1")" --config.recipe="$1" ${SEEDS:+--config.seeds="$SEEDS"} \
    --config.awn_reference=results/awn_published_recipe_torchinit_20ep_fashion_mnist.json "${@:2}"
}
final_dir() { echo "$RUNS/final_$1${SEEDS:+_seeds}"; }

# Runs "$@" (a comparison of every method) unless its --plan has runs left: that comparison
# would train them one after another in this process.
when_nothing_left() {
  local left
  left=$("$@" --plan | tail -1)
  case "$left" in
    "0 of "*) "$@" ;;
    *) echo "not yet: $left (see: $0 ${PLAN_MODE})" >&2; exit 1 ;;
  esac
}

each() {  # each LABEL COMMAND...: one line before and after, for the log
  echo "== $1: started $(date -u +%FT%TZ)"
  "${@:2}"
  echo "== $1: done $(date -u +%FT%TZ)"
}

case "${1:-plan}" in
  plan) search --workdir "$RUNS" --config.recipes="$RECIPES" --config.methods="$METHODS" --plan ;;
  run)
    shift
    for pair in "$@"; do
      recipe=${pair%%:*} method=${pair##*:}
      each "$recipe $method" search --workdir "$RUNS/recipe_$recipe" --config.recipe="$recipe" --config.methods="$method"
    done
    ;;
  choose)
    PLAN_MODE=plan when_nothing_left search --workdir "$RUNS" --config.recipes="$RECIPES" --config.methods="$METHODS"
    ;;
  final-plan) final "${2:?usage: $0 final-plan RECIPE}" --config.methods="$METHODS" --plan ;;
  final)
    recipe=${2:?usage: $0 final RECIPE [METHOD ...]}
    shift 2
    if (($#)); then
      for method in "$@"; do each "final $recipe $method" final "$recipe" --config.methods="$method"; done
    else
      PLAN_MODE="final-plan $recipe" when_nothing_left final "$recipe" --config.methods="$METHODS"
      echo "The comparison is in $(final_dir "$recipe")/compare.{json,md,png}."
    fi
    ;;
  *) echo "usage: $0 plan | run RECIPE:METHOD [...] | choose | final-plan RECIPE | final RECIPE [METHOD ...]" >&2; exit 2 ;;
esac
