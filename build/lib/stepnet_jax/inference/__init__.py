"""Using a trained network: the ``Stepper`` handle and ``load``, stopping policies, reading
checkpoints, export, timing, per-exit metrics and policy sweeps. Imports no training code."""
