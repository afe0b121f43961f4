"""Optuna trials as hwexp runs: the task side of ``hydra/sweeper=hwexp_optuna`` and what the
sweeper (``hydra_plugins.hwexp_optuna_sweeper``) shares with it.

The sweeper asks the study (in its storage) for a trial and launches one ordinary hwexp job for
it, whose overrides are the trial's parameters plus a ``sweep_trial`` block (``SweepTrial``):
where the study lives and which trial this is. The job (``run_trial``), in whatever process or
machine the launcher chose, re-opens that trial from storage, reports the monitored validation
metric after every epoch through ``train_and_evaluate``'s ``epoch_hook`` (``PruningHook``), stops
when the study's pruner says so (``optuna.TrialPruned``), and logs itself as a child MLflow run
of the study's parent run (``StudyRun``). Only the sweeper tells the study how a trial ended.

Trial states and how they count (``TrialCounts``):

* COMPLETE and PRUNED are *done*: a sweep stops once ``n_trials`` are done in the study.
* FAIL is not done: the trial is replaced. Its kind (``failure_kind``) is ``error`` (an
  exception or a non-finite loss/objective; user attr ``error`` holds the message; these count
  against ``max_failure_rate``), ``interrupted`` (its process died; found by heartbeats and
  failed by the next worker, never counted as an error) or ``surplus`` (asked by a worker that
  lost the race for the last trial; never run, never counted).

hwexp's trainer stays free of Optuna; mlflow is only used through ``hwexp.tracking``.

Modules: ``storage`` (Optuna storages), ``study`` (bookkeeping, the parent run), ``trial`` (the
job side), ``overrides`` (override values) and ``pruners`` (``TopFractionPruner``). The sweeper
plugin imports ``storage``, ``study``, ``overrides`` and ``SweepTrial``; a job imports ``trial``.
"""
