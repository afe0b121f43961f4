"""MLflow tracking, the only place hwexp writes runs: ``writer`` (one run: ``Tracker``),
``reports`` (tables and figures a run holds) and ``runs`` (lookup, loading, registry, sweeps).

What a run holds once ``hwexp.train.train_and_evaluate`` is done with it:

* params: the flattened, resolved config (``trainer.lr``, ``model.widths``, ...);
* tags: ``dataset``, ``source``, ``num_classes``, ``image_size``, ``model``, ``hostname``,
  ``git_commit`` (and ``mlflow.source.git.commit``) when the code is in a git checkout,
  ``hwexp.init_from`` (the source run's id) when ``trainer.init_from`` is set;
* metrics named ``<split>/<measure>`` (``hwexp.contract``): per epoch (step = completed
  epochs) ``train/loss``, ``train/accuracy``, ``train/learning_rate``, ``val/loss``,
  ``val/accuracy``, ...; at the end ``test/*``, ``val/best_accuracy``, ``train/epochs``, ...;
* artifacts: ``config.yaml``, ``model/model.keras`` + ``model/classes.txt``,
  ``evaluation/*.csv|md|png``, ``training/history.csv`` and ``training/curves.png``.
"""
