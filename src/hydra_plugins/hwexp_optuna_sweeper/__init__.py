"""hwexp's Optuna sweeper for Hydra: ``hydra/sweeper=hwexp_optuna``.

Why not hydra-optuna-sweeper 1.3: it needs optuna<3 (which breaks on SQLAlchemy 2), cannot
prune, restarts ``n_trials`` on every resume, and its ``n_jobs`` waits for whole batches. This
one keeps its config vocabulary (``params`` with ``interval``/``int(interval)``/
``tag(log, interval)``/``choice``/``range``; ``direction``, ``n_trials``, ``storage``,
``study_name``, ``sampler``) on current Optuna, and adds:

Pruning
    ``hydra/sweeper/pruner=median|successive_halving|top_fraction|hyperband|none``
    (``top_fraction``: ``hwexp.sweep.pruners.TopFractionPruner``). Every job reports
    ``monitor`` (default ``val_accuracy``) after each epoch and stops when pruned; such trials
    are PRUNED in the study and KILLED (tag ``hwexp.trial_state=PRUNED``) in MLflow.

Resume
    Rerunning the same command continues the study (same ``storage`` + ``study_name``) until it
    holds ``n_trials`` COMPLETE + PRUNED trials; raise ``hydra.sweeper.n_trials`` to add more.
    FAIL trials do not count: they are replaced. A trial whose process was killed keeps no
    heartbeat; after ``grace_period`` seconds the next worker (or the next start) marks it FAIL
    and, with ``retry_interrupted``, runs its parameters again once.

Failures
    An exception, a NaN/inf loss or a non-finite objective makes the trial FAIL with the message
    in its user attr ``error``; the sweep goes on while such failures number at most
    ``floor(max_failure_rate * n_trials)`` (interrupted and surplus trials are not counted).

Many workers
    Start the same command on several processes or machines with one ``storage`` and
    ``study_name``: they share the study, never duplicate a trial number and stop together at
    ``n_trials`` (each worker counts the study before it asks; a trial asked in a race it lost
    is told FAIL with user attr ``surplus`` and never runs). SQLite (the default,
    ``sqlite:///<mlruns>/optuna.db``) serves the processes of one machine; across machines use
    PostgreSQL, e.g. ``hydra.sweeper.storage=postgresql://hwexp@db-host:5432/optuna`` (psycopg
    is installed with hwexp; keep the password in ``~/.pgpass`` or ``PGPASSWORD``: the URL is
    passed to every trial and recorded in its config). Give each worker its own
    ``hydra.sweeper.sampler.seed`` (or none), or they sample the same first parameters.

Launchers
    The basic launcher runs one trial at a time in the sweeper's process. For parallel trials on
    one machine: ``hydra/launcher=joblib hydra.launcher.n_jobs=2 hydra.sweeper.n_jobs=2`` (each
    of the ``n_jobs`` loops launches one job at a time, so a slow trial never holds up the
    others). On a SLURM cluster: ``pip install hydra-submitit-launcher`` and
    ``hydra/launcher=submitit_slurm hydra.sweeper.n_jobs=8 hydra.launcher.timeout_min=120
    hydra.launcher.gpus_per_node=1 hydra.launcher.partition=<partition>``, with PostgreSQL
    storage and an MLflow server (``tracking.uri=http://...``) that the nodes reach. Jobs
    re-open their trial from the storage named in their ``sweep_trial`` override, so they may run
    in any process or on any node.

MLflow
    One parent run per study (sampler, pruner, search space and storage as params; tag
    ``hwexp.sweep_id`` = the absolute ``hydra.sweep.dir``; best value/params, trial counts,
    ``study/trials.csv`` and optimisation-history, intermediate-value and parameter-importance
    plots once a worker stops), one child run per trial (its config, curves and metrics; tags
    ``hwexp.trial_number``, ``hwexp.trial_state``, ``hwexp.trial_params``); the best trial's run
    carries ``hwexp.best_trial=true``.

Modules: ``config`` (structured configs, ConfigStore), ``hwexp_optuna_sweeper`` (the plugin
class), ``_search_space`` (parsing), ``_impl`` (the loop); the job side is ``hwexp.sweep.trial``.
"""
