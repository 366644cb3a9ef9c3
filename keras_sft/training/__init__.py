"""A training run: from a config and a workdir to a trained, exported model.

- `train`: `train_and_evaluate(config, workdir)` and `evaluate`.
- `recipe`: derived numbers (`make_plan`) and the one builder of a run's
  compiled model (`build_model`).
- `optimizers`: one entry per optimizer with its capabilities; schedules.
- `checkpoints`: atomic backups, best weights, resuming.
- `callbacks`: the callback list of `fit`, in its checked order.
- `evaluation_weights`: the weights a run validates and exports (EMA,
  precise BN); `evaluation`: the report.
- `distribution`, `multi_worker`, `precision`: strategies, Keras'
  multi-worker fixes, dtype policies.
- `progress`, `hyperrule`: progress lines; BiT-HyperRule.
"""
