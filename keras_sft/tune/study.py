"""The study: its trials, run by as many worker processes as are started.

Every worker runs the same loop (`run_worker`):

1. Open the study (create it, or check that the one in the storage is of
   the same space, config and data: another study is refused, untouched).
2. Make sure the study holds `trials` trials (`_ensure_trials`): they are
   queued once, as WAITING trials, under the study's mutex, so several
   workers starting together queue them once. Trial 0 runs the config's own
   values (the defaults) when they lie inside the space; the next ones
   (`Options.variant_trials`) change one categorical key of the defaults
   each, so each switch of the space (BN policy, crop, flip, freeze depth)
   is measured against the defaults rather than left to sampling; TPE
   samples the rest.
3. Take a WAITING trial (an atomic WAITING -> RUNNING in the storage: no
   two workers get the same one), sample its values (TPE), run it, tell the
   study. A worker with nothing left to take waits for the running trials
   of others (when it runs the final step), then stops.
4. Before each take, declare dead the RUNNING trials whose worker is gone
   (`storage.is_dead`, and Optuna's heartbeat with a database): each is
   set to FAIL and requeued as a new trial with the same values, which runs
   in the first trial's workdir and resumes its last backup. The FAIL and
   the requeue happen under the mutex, once.

So the study ends with exactly `trials` finished trials (COMPLETE, PRUNED,
or FAIL for a diverged or refused run), plus one FAIL per killed attempt,
each named as retried by its successor.
"""

import dataclasses
import logging
import os
import time

import optuna

from keras_sft import errors
from keras_sft.data import folders
from keras_sft import workdir as workdir_lib
from keras_sft.tune import storage as storage_lib
from keras_sft.tune import trial as trial_lib

# Study user attributes: what the study was started with.
IDENTITY_ATTR = 'keras_sft'
DEFAULTS_ATTR = 'defaults_trial'
VARIANT_ATTR = 'changed_from_defaults'
# Seconds between looks at the study while waiting for others' trials.
_POLL_SECONDS = 2.0

TrialState = optuna.trial.TrialState


@dataclasses.dataclass(frozen=True)
class Options:
  """The study's settings (the command's flags).

  Attributes:
    trials: Trials in the study in all (a rerun with more adds some).
    timeout_seconds: None, or stop taking trials after this long.
    storage: None (journal file in the workdir), a journal path or a URL.
    study_name: The study's name in the storage.
    validation_fraction: Fraction of the training data trials are scored
      on.
    pruner: 'successive_halving', 'hyperband', 'median' or 'none'.
    wait_for_others: Wait for other workers' running trials before
      returning (the final step needs them all).
    grace_seconds: A worker on another host silent for this long is dead.
    variant_trials: Trials after the defaults that change one categorical
      key each (`space.Space.variants`); None: half the others, rounded
      down. Queued when the study is created.
  """
  trials: int
  timeout_seconds: float = None
  storage: str = None
  study_name: str = None
  validation_fraction: float = 0.1
  pruner: str = 'successive_halving'
  wait_for_others: bool = True
  grace_seconds: float = 120
  variant_trials: int = None

  def variant_count(self):
    if self.variant_trials is not None:
      return self.variant_trials
    # 12 trials: the defaults, 5 variants, 6 sampled. A study of 12 TPE
    # trials over finetune.py's 9 keys tried random_crop=True and
    # random_flip=True in all 12 (benchmarks/tune.py, 2026-12-06).
    return (self.trials - 1) // 2


PRUNERS = ('successive_halving', 'hyperband', 'median', 'none')


def create_pruner(name, config, space=None):
  """Optuna's pruner `name`, with epochs as its resource (up to
  `config.num_epochs`; `trial.first_pruning_epoch` of `config` and
  `space` is the first rung)."""
  errors.check_choice('pruner', name, PRUNERS)
  max_epochs = config.num_epochs
  first = trial_lib.first_pruning_epoch(config, space)
  if name == 'successive_halving':
    # Asynchronous successive halving: at epochs r, 3r, 9r, ... (r =
    # first_pruning_epoch) a trial goes on only if it is in the best third
    # of the trials that got there.
    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource=first, reduction_factor=3)
  if name == 'hyperband':
    return optuna.pruners.HyperbandPruner(
        min_resource=first, max_resource=max_epochs, reduction_factor=3)
  if name == 'median':
    # Steps are epochs (1-based); the first prunable step is n_warmup_steps.
    return optuna.pruners.MedianPruner(n_startup_trials=2,
                                       n_warmup_steps=first)
  return optuna.pruners.NopPruner()


def create_sampler(trials):
  """TPE, multivariate; random for its first third of trials (at most 10).

  `constant_liar`: a worker sampling while others run treats their
  running trials as bad, so parallel workers do not sample one point.
  No seed: workers seeded alike would propose the same values.
  """
  return optuna.samplers.TPESampler(
      n_startup_trials=max(1, min(10, trials // 3)), multivariate=True,
      constant_liar=True)


def identity(config, space, options):
  """What must not change between the workers and reruns of a study."""
  result = {'config': workdir_lib.config_to_dict(config),
            'space': space.to_json(),
            'validation_fraction': options.validation_fraction,
            'pruner': options.pruner}
  if folders.is_folder_dataset(config.dataset):
    # The image files under the folder (what its splits can read; each
    # trial's run checks the files it reads itself).
    root = folders.folder_root(config.dataset)
    result['files'] = workdir_lib.fingerprint_files(root, [
        os.path.join(directory, name)
        for directory, _, names in os.walk(root) for name in names
        if name.lower().endswith(folders.IMAGE_EXTENSIONS)])
  return workdir_lib.config_to_dict(result)


def _flatten(tree, prefix=''):
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def _differences(recorded, current):
  old, new = _flatten(recorded), _flatten(current)
  return '; '.join(f'{key}: {old.get(key, "<absent>")!r} in the study, '
                   f'{new.get(key, "<absent>")!r} now'
                   for key in sorted(set(old) | set(new))
                   if old.get(key, '<absent>') != new.get(key, '<absent>'))


def open_study(storage, name, study_identity, sampler, pruner, where):
  """Creates the study, or loads it and checks it is the same study.

  Raises:
    WorkdirError: the storage holds a study of that name with another
      space, config, data or settings (left as it is).
  """
  # Loaded first: an existing study, even another one, is only read.
  try:
    study = optuna.load_study(storage=storage, study_name=name,
                              sampler=sampler, pruner=pruner)
  except KeyError:
    try:
      study = optuna.create_study(storage=storage, study_name=name,
                                  direction='maximize', sampler=sampler,
                                  pruner=pruner)
    except optuna.exceptions.DuplicatedStudyError:  # Another worker's.
      study = optuna.load_study(storage=storage, study_name=name,
                                sampler=sampler, pruner=pruner)
  recorded = study.user_attrs.get(IDENTITY_ATTR)
  if isinstance(recorded, dict) and isinstance(recorded.get('config'), dict):
    # A study begun before a config key existed continues, as a run's
    # workdir does (the hostile pass: two keys added to the defaults made
    # every older study "another search", whatever the flags).
    recorded = {**recorded, 'config': workdir_lib.with_keys_added_later(
        recorded['config'], study_identity.get('config'))}
  if recorded is None:
    # New, or created by a worker killed before it wrote this: ours.
    study.set_user_attr(IDENTITY_ATTR, study_identity)
  elif recorded != study_identity:
    raise errors.WorkdirError(
        f'{where} holds the study {name!r} of another search: '
        f'{_differences(recorded, study_identity)}. Nothing was changed. '
        'Rerun with the same config, space and flags to continue it, or use '
        'a new --workdir (or --study_name).')
  return study


def _replaced(trials):
  """Numbers of failed trials that a later trial retries."""
  return {number for trial in trials
          for number in trial.system_attrs.get('retry_history', [])}


def counted(trials):
  """The trials that take a place of the budget: all but retried FAILs."""
  replaced = _replaced(trials)
  return [trial for trial in trials if trial.number not in replaced]


def _ensure_trials(study, storage, workdir, name, total, defaults,
                   variants=()):
  """Queues WAITING trials until the study holds `total`; under the mutex.

  A new study's first trials are the `defaults` (if any), then `variants`
  (`[(values, description)]`, see `space.Space.variants`).

  Returns:
    The number queued by this call.
  """
  with storage_lib.mutex(storage, workdir, name):
    trials = study.get_trials(deepcopy=False)
    missing = total - len(counted(trials))
    if missing <= 0:
      return 0
    first = []
    if not trials and defaults is not None:
      # The config's own values: the summary compares the best with it.
      first = [(defaults, {DEFAULTS_ATTR: True})] + [
          (values, {VARIANT_ATTR: description})
          for values, description in variants]
    for index in range(missing):
      if index < len(first):
        study.enqueue_trial(first[index][0], user_attrs=first[index][1])
      else:
        study.enqueue_trial({})
    return missing


def _recover_dead(study, storage, workdir, name, grace_seconds):
  """Fails and requeues the RUNNING trials whose worker is gone.

  Returns:
    The numbers of the trials declared dead.
  """
  running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
  heartbeat = isinstance(storage, optuna.storages.RDBStorage)
  if not heartbeat and not any(
      storage_lib.is_dead(workdir, trial.user_attrs.get(trial_lib.WORKER_ATTR),
                          grace_seconds) for trial in running):
    return []
  dead = []
  with storage_lib.mutex(storage, workdir, name):
    if heartbeat:
      # Optuna's own: RUNNING trials without a heartbeat for the grace
      # period are failed and requeued by the storage's callback.
      before = {trial.number for trial in study.get_trials(
          deepcopy=False, states=(TrialState.FAIL,))}
      optuna.storages.fail_stale_trials(study)
      dead += [trial.number for trial in study.get_trials(
          deepcopy=False, states=(TrialState.FAIL,))
               if trial.number not in before]
    for trial in study.get_trials(deepcopy=False,
                                  states=(TrialState.RUNNING,)):
      worker = trial.user_attrs.get(trial_lib.WORKER_ATTR)
      if not storage_lib.is_dead(workdir, worker, grace_seconds):
        continue
      try:
        # Returns True for the one caller that makes the change (the mutex
        # already makes this caller the only one).
        if not storage.set_trial_state_values(trial._trial_id,  # pylint: disable=protected-access
                                              state=TrialState.FAIL):
          continue
      except optuna.exceptions.UpdateFinishedTrialError:
        continue
      failed = storage.get_trial(trial._trial_id)  # pylint: disable=protected-access
      storage_lib.retry_callback()(study, failed)
      storage_lib.forget(workdir, worker)
      dead.append(trial.number)
  for number in dead:
    print(f'Trial {number}: its worker is gone (killed?); requeued with the '
          'same values, to resume its workdir.', flush=True)
  return dead


def _take(study, storage):
  """A WAITING trial, now RUNNING for this worker; None if there is none.

  `Study.ask` would create a new trial when none waits, beyond the budget;
  this takes only queued ones (the storage's WAITING -> RUNNING change is
  atomic, as in `Study.ask`).
  """
  for waiting in study.get_trials(deepcopy=False,
                                  states=(TrialState.WAITING,)):
    try:
      if storage.set_trial_state_values(waiting._trial_id,  # pylint: disable=protected-access
                                        state=TrialState.RUNNING):
        return optuna.Trial(study, waiting._trial_id)  # pylint: disable=protected-access
    except optuna.exceptions.UpdateFinishedTrialError:
      continue
  return None


def _heartbeat(storage, trial_id):
  """Optuna's heartbeat thread for a database storage (else a no-op)."""
  if isinstance(storage, optuna.storages.RDBStorage):
    return optuna.storages._heartbeat.HeartbeatThread(trial_id, storage)  # pylint: disable=protected-access
  return optuna.storages._heartbeat.NullHeartbeatThread()  # pylint: disable=protected-access


@dataclasses.dataclass
class Progress:
  """Progress lines: trial k of N, best so far, ETA."""
  total: int
  started: float = dataclasses.field(default_factory=time.monotonic)

  def line(self, study, finished_trial, outcome):
    trials = counted(study.get_trials(deepcopy=False))
    done = [t for t in trials if t.state.is_finished()]
    complete = [t for t in done if t.state == TrialState.COMPLETE]
    running = [t for t in trials if t.state == TrialState.RUNNING]
    left = len([t for t in trials if not t.state.is_finished()])
    best = max(complete, key=lambda t: t.value, default=None)
    workers = max(1, len({t.user_attrs.get(trial_lib.WORKER_ATTR)
                          for t in running}))
    seconds = [t.user_attrs.get(trial_lib.SECONDS_ATTR) for t in done]
    seconds = [s for s in seconds if s]
    eta = (sum(seconds) / len(seconds) * left / workers) if seconds else None
    value = ('' if outcome.value is None else
             f'val accuracy {outcome.value:.4f}, ')
    what = {TrialState.COMPLETE: 'done', TrialState.PRUNED: 'pruned',
            TrialState.FAIL: 'failed'}[outcome.state]
    best_text = (f'best so far {best.value:.4f} (trial {best.number})'
                 if best else 'no complete trial yet')
    eta_text = f', ETA {_duration(eta)}' if eta is not None and left else ''
    return (f'Trial {finished_trial.number} ({len(done)} of {self.total} '
            f'finished) {what}: {value}{outcome.epochs} epoch(s). '
            f'{best_text}; {left} left{eta_text}.')


def _duration(seconds):
  if seconds < 90:
    return f'{seconds:.0f} s'
  if seconds < 5400:
    return f'{seconds / 60:.0f} min'
  return f'{seconds / 3600:.1f} h'


def run_worker(config, workdir, space, options):
  """Runs trials of the study until none is left (see the module doc).

  Args:
    config: The study's base config (checked, see `space.validate`).
    workdir: The study's directory.
    space: The checked `space.Space`.
    options: `Options`.

  Returns:
    The `optuna.Study`.
  """
  storage = storage_lib.open_storage(options.storage, workdir,
                                     options.grace_seconds)
  name = options.study_name or os.path.basename(os.path.abspath(workdir))
  where = (f'--storage={storage_lib.redact(options.storage)}'
           if options.storage else f'workdir={workdir!r}')
  study = open_study(storage, name, identity(config, space, options),
                     create_sampler(options.trials),
                     create_pruner(options.pruner, config, space), where)
  os.makedirs(workdir, exist_ok=True)
  if options.pruner != 'none' and not trial_lib.pruning_is_possible(
      config, space):
    logging.warning(
        'No trial can be pruned: num_epochs=%d leaves no epoch after the '
        'first pruning epoch (%d: one after the warmup and head-only phase '
        'end, at their largest values in the space), so every trial runs '
        'all its epochs. Raise num_epochs or lower those phases to prune.',
        config.num_epochs, trial_lib.first_pruning_epoch(config, space))
  defaults = space.defaults(config)
  if defaults is None:
    logging.warning('The config\'s own values of %s lie outside the space: '
                    'no trial runs the defaults, and the summary compares '
                    'with none.', list(space.keys))
  variants = (space.variants(defaults, options.variant_count())
              if defaults is not None else [])
  _ensure_trials(study, storage, workdir, name, options.trials, defaults,
                 variants)
  worker = storage_lib.Worker(workdir)
  progress = Progress(total=len(counted(study.get_trials(deepcopy=False))))
  deadline = (None if options.timeout_seconds is None else
              time.monotonic() + options.timeout_seconds)
  running_trial = True  # Until the loop ends normally.
  try:
    while True:
      if deadline is not None and time.monotonic() > deadline:
        print(f'--timeout={options.timeout_seconds:g} s reached: no new '
              'trial starts here; rerun to continue the study.', flush=True)
        break
      _recover_dead(study, storage, workdir, name, options.grace_seconds)
      trial = _take(study, storage)
      if trial is None:
        running = study.get_trials(deepcopy=False,
                                   states=(TrialState.RUNNING,))
        if not running or not options.wait_for_others:
          break
        time.sleep(_POLL_SECONDS)
        continue
      _run_one(study, storage, trial, worker, space, config, workdir,
               options, progress)
    running_trial = False
  finally:
    worker.close(running_trial)
  return study


def _run_one(study, storage, trial, worker, space, config, workdir, options,
             progress):
  trial.set_user_attr(trial_lib.WORKER_ATTR, worker.name)
  frozen = storage.get_trial(trial._trial_id)  # pylint: disable=protected-access
  first = frozen.system_attrs.get('failed_trial')
  print(f'Trial {trial.number} of {progress.total} starts'
        f'{f" (retry of trial {first}, resuming its workdir)" if first is not None else ""}'
        f' on {worker.name}.', flush=True)
  with _heartbeat(storage, trial._trial_id):  # pylint: disable=protected-access
    outcome = trial_lib.run(trial, frozen, space, config, workdir,
                            options.validation_fraction)
  if outcome.state == TrialState.COMPLETE:
    study.tell(trial, outcome.value)
  else:
    study.tell(trial, state=outcome.state)
    # Once told, a pruned or failed trial never runs again: its backups
    # (two of a ResNet50 with its optimizer state: ~0.4 GB) would only fill
    # the disk over a long study. Its history, logs and TensorBoard stay.
    trial_lib.discard_backups(workdir, frozen)
  print(progress.line(study, trial, outcome), flush=True)
