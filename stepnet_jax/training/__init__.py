"""Training: one train step, one loop, one way to run in a workdir.

* ``step.py``: ``TrainState`` and ``make_train_step(graphdef, tx, objective)``, the one
  jitted step every trainer uses (objectives live in ``losses.py``);
* ``optim.py``: optimizers and learning-rate schedules by name, ``train_only`` (freeze all
  parameters but a selection);
* ``loop.py``: ``run_steps`` (feeding a batch iterator to a step under ``LoopSettings``),
  metrics, progress;
* ``checkpoints.py``: writing checkpoints and ``config.json`` (reading is ``inference/restore.py``);
* ``run.py``: ``train_and_evaluate`` (resumable joint training), ``PhasedRun`` (the
  shared start and end of construction and the non-uniform baseline) and
  ``check_workdir`` (may this workdir's run be continued or reused?).
* ``fit.py``: ``fit(model, tx, objective, batches, steps, seed=...)``, a model trained for a
  number of steps on a batch iterator (the short trainings beside a run: fine-tunes, BN
  retraining, the selection module).

Import the submodules (``from stepnet_jax.training import run``); this package file
imports nothing.
"""
