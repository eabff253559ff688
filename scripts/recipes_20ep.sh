#!/usr/bin/env bash
# The 20-epoch recipe search on the validation split (5,000 training images held out): every
# method of the 20-epoch comparison under each recipe of RECIPES, chosen by the mean
# validation accuracy over all methods' levels (compare.RECIPE_RULE). One method and recipe
# takes 0.5-2 hours on 2 CPU cores, so each runs as a process of its own (two at a time on
# 2 cores), resumable with the same command; every finished one is recorded in
# results/ledger (commit it), so the search can span sessions and machines.
#
#   scripts/recipes_20ep.sh plan                       what is recorded, left or still to train
#   scripts/recipes_20ep.sh run RECIPE:METHOD [...]    train those, one after the other
#   scripts/recipes_20ep.sh choose                     RUNS/recipes.{json,md,png}; refused until plan has nothing left
#
# RUNS (default runs/recipes_20ep, relative to the repository) holds the run directories.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/recipes_20ep}
RECIPES=common,published_torch,sgd_cosine_1e-4_torch,sgd_cosine_5e-4_torch
METHODS=steppingnet,awn,awn_sandwich,slimmable,independent
# XLA:CPU trains ~1.4x faster with large freed blocks kept in the heap (scripts/main.sh).
export MALLOC_ARENA_MAX=${MALLOC_ARENA_MAX:-1} MALLOC_MMAP_MAX_=${MALLOC_MMAP_MAX_:-0} \
       MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-100000000000}

search() {
  .venv/bin/python -m stepnet_jax.compare --config configs/compare_fashion_mnist.py \
    --config.common.data.validation_examples=5000 --config.common.train.num_epochs=20 \
    --config.extra_budgets= --config.common.train.checkpoint_every_steps=200 \
    --config.ledger=results/ledger "$@"
}

case "${1:-plan}" in
  plan) search --workdir "$RUNS" --config.recipes="$RECIPES" --config.methods="$METHODS" --plan ;;
  run)
    shift
    for pair in "$@"; do
      recipe=${pair%%:*} method=${pair##*:}
      echo "== $recipe $method: started $(date -u +%FT%TZ)"
      search --workdir "$RUNS/recipe_$recipe" --config.recipe="$recipe" --config.methods="$method"
      echo "== $recipe $method: done $(date -u +%FT%TZ)"
    done
    ;;
  choose)
    # Choosing trains whatever is missing, one run after another: refuse until nothing is left.
    left=$(search --workdir "$RUNS" --config.recipes="$RECIPES" --config.methods="$METHODS" --plan | tail -1)
    case "$left" in
      "0 of "*) search --workdir "$RUNS" --config.recipes="$RECIPES" --config.methods="$METHODS" ;;
      *) echo "not choosing yet: $left (see: $0 plan)" >&2; exit 1 ;;
    esac
    ;;
  *) echo "usage: $0 plan | run RECIPE:METHOD [...] | choose" >&2; exit 2 ;;
esac
