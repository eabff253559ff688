"""Training: one train step, one loop, one way to run in a workdir.

* ``step.py``: ``TrainState`` and ``make_train_step(graphdef, tx, objective)``, the one
  jitted step every trainer uses (objectives live in ``losses.py``);
* ``optim.py``: optimizers and learning-rate schedules by name;
* ``loop.py``: feeding batches to a step, metrics, progress;
* ``checkpoints.py``: writing checkpoints and ``config.json`` (reading is ``inference/restore.py``);
* ``run.py``: ``train_and_evaluate`` (resumable joint training), ``PhasedRun`` (the
  shared start and end of construction and the non-uniform baseline) and
  ``check_workdir`` (may this workdir's run be continued or reused?).

Import the submodules (``from stepnet_jax.training import run``); this package file
imports nothing.
"""
