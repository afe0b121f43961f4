"""MLflow tracking, the only place hwexp writes runs: ``writer`` (one run: ``Tracker``),
``reports`` (tables and figures a run holds), ``mlmodels`` (MLflow models and datasets;
``keras_pyfunc`` is the code of a run's model) and ``runs`` (lookup, loading, registry, sweeps).

What a run holds once ``hwexp.train.train_and_evaluate`` is done with it:

* params: the flattened, resolved config (``trainer.lr``, ``model.widths``, ...);
* tags: ``dataset``, ``source``, ``num_classes``, ``image_size``, ``model``,
  ``hwexp.model_name`` (``hwexp.contract.model_name``), ``hostname``,
  ``git_commit`` (and ``mlflow.source.git.commit``) when the code is in a git checkout,
  ``hwexp.init_from`` (the source run's id) when ``trainer.init_from`` is set;
* metrics named ``<split>/<measure>`` (``hwexp.contract``): per epoch (step = completed
  epochs) ``train/loss``, ``train/accuracy``, ``train/learning_rate``, ``val/loss``,
  ``val/accuracy``, ...; at the end ``test/*``, ``val/best_accuracy``, ``train/epochs``, ...;
* dataset inputs: one per prepared source (name = cache entry, digest = cache fingerprint,
  context ``training``, tags ``hwexp.class_set`` and ``hwexp.source``);
* the MLflow model ``model`` (``runs:/<run id>/model``; an MLflow 3 logged model, linked to
  the run's test metrics): pyfunc over ``artifacts/model.keras`` + ``artifacts/classes.txt``,
  signature and input example (``mlmodels``); runs logged before it hold
  ``model/model.keras`` + ``model/classes.txt`` as plain artifacts, and still load;
* artifacts: ``config.yaml``, ``evaluation/*.csv|md|png``, ``training/history.csv`` and
  ``training/curves.png``.
"""
