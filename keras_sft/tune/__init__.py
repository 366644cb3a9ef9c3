"""`python -m keras_sft.tune`: a hyperparameter study over ordinary runs.

A study varies the config keys named by a search space file
(`configs/spaces/*.py`, see `space`) with Optuna's TPE sampler; each trial is
an ordinary run in `<workdir>/trials/<n>/`, scored on a validation split
carved from the training data (`splits`), pruned on its per-epoch
validation accuracy (`trial`). `study` runs a worker: many may share one
study (one journal file, or a PostgreSQL database; `storage`). `report`
writes the leaderboard, plots and a summary in words; `final` retrains the
best configuration on the whole training split and evaluates it on the test
split once.

Modules are imported by the command after its flags are parsed, so `--help`
loads neither Optuna nor TensorFlow.
"""
