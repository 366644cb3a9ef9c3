"""Where a study lives, who is working on it, and who has died.

- `open_storage`: Optuna's journal file in the workdir by default
  (`<workdir>/study.journal`: appended to, never rewritten, so a process
  killed at any moment loses nothing written before), a journal file
  elsewhere (a shared file system), or a database URL
  (`postgresql://user:password@host/db`, shared by machines).
- `mutex`: one worker at a time adds trials or declares a trial dead, so no
  trial is added or retried twice: `flock` on `<workdir>/study.lock`, or a
  PostgreSQL advisory lock when the workers share a database.
- `Worker`: each worker process holds a lock file in `<workdir>/workers/`
  for its life and records its name in the trials it runs. The operating
  system releases the lock when the process ends, `kill -9` included, so a
  worker on the same host knows at once that a trial's worker is gone.
  Workers on other hosts are judged by the file's age (refreshed every
  `HEARTBEAT_SECONDS`) and, with a database, by Optuna's heartbeat.
"""

import contextlib
import fcntl
import hashlib
import os
import re
import socket
import threading
import time
import uuid

import warnings

import optuna

from keras_sft import errors
from keras_sft import workdir as workdir_lib

JOURNAL_FILE = 'study.journal'
_MUTEX_FILE = 'study.lock'
_WORKERS = 'workers'
# A worker refreshes its lock file and its trial's heartbeat this often.
HEARTBEAT_SECONDS = 10
# Seconds of database connection attempts before the server is declared
# unreachable.
_CONNECT_TIMEOUT_SECONDS = 10


def is_database(url):
  return bool(url) and re.match(r'^[a-z0-9+]+://', url) is not None


def redact(url):
  """`url` without its password, for messages and logs."""
  return re.sub(r'://([^:/@]+):[^@]*@', r'://\1:***@', url or '')


def open_storage(url, workdir, grace_seconds):
  """The study's Optuna storage.

  Args:
    url: None (the journal file in `workdir`), a file path (a journal file,
      e.g. on a shared file system), or an SQLAlchemy database URL.
    workdir: The study's directory (created for the journal file).
    grace_seconds: With a database: a running trial whose worker has not
      sent a heartbeat for this long is failed and retried.

  Raises:
    UnavailableError: the database cannot be reached.
    MissingDependencyError: its driver is not installed.
  """
  if not is_database(url):
    path = url or os.path.join(workdir, JOURNAL_FILE)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(path))
  engine_kwargs = {'pool_pre_ping': True}
  if url.startswith('postgresql'):
    engine_kwargs['connect_args'] = {
        'connect_timeout': _CONNECT_TIMEOUT_SECONDS}
  try:
    return _rdb_storage(_with_driver(url), engine_kwargs, grace_seconds)
  except ImportError as error:
    # Optuna re-raises the driver's ModuleNotFoundError as an ImportError.
    missing = getattr(error.__cause__, 'name', None) or getattr(
        error, 'name', None)
    raise errors.MissingDependencyError(
        f'--storage={redact(url)} needs the database driver {missing!r}, '
        'which is not installed: pip install keras-sft[tune] (PostgreSQL: '
        'psycopg[binary]).') from error
  except Exception as error:  # SQLAlchemy's errors have many types.
    reason = str(error).strip().splitlines()[0] if str(error) else ''
    raise errors.UnavailableError(
        f'Cannot reach the study database --storage={redact(url)}: '
        f'{type(error).__name__}: {reason[:300]}. Check that the server '
        'runs and the URL (host, port, user, password, database) is right; '
        'nothing was changed.') from error


def _with_driver(url):
  """`postgresql://` as psycopg 3's URL, whatever SQLAlchemy's default
  driver (psycopg2 before SQLAlchemy 2.1)."""
  if url.startswith('postgresql://'):
    return 'postgresql+psycopg://' + url[len('postgresql://'):]
  return url


def _rdb_storage(url, engine_kwargs, grace_seconds, attempts=5):
  """Optuna's RDBStorage; retried while another worker creates the tables
  (workers starting together on an empty database race in CREATE TABLE)."""
  for attempt in range(attempts):
    try:
      return optuna.storages.RDBStorage(
          url, engine_kwargs=engine_kwargs,
          heartbeat_interval=HEARTBEAT_SECONDS, grace_period=grace_seconds,
          heartbeat_stale_trial_callback=retry_callback())
    except Exception as error:  # pylint: disable=broad-except
      racing = (type(error).__name__ in ('IntegrityError', 'ProgrammingError')
                and ('already exists' in str(error) or
                     'duplicate key' in str(error)))
      if not racing or attempt == attempts - 1:
        raise
      time.sleep(1 + attempt)


def retry_callback():
  """Requeues a dead trial with its values, up to 3 times (Optuna's)."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
    return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)


@contextlib.contextmanager
def mutex(storage, workdir, study_name):
  """Held by one worker of the study at a time (blocking)."""
  if isinstance(storage, optuna.storages.RDBStorage) and (
      storage.engine.dialect.name == 'postgresql'):
    import sqlalchemy  # pylint: disable=g-import-not-at-top
    key = int.from_bytes(hashlib.sha256(
        f'keras_sft.tune:{study_name}'.encode()).digest()[:8], 'big',
                         signed=True)
    with storage.engine.connect() as connection:
      connection.execute(sqlalchemy.text('SELECT pg_advisory_lock(:key)'),
                         {'key': key})
      try:
        yield
      finally:
        connection.execute(sqlalchemy.text('SELECT pg_advisory_unlock(:key)'),
                           {'key': key})
        connection.commit()
    return
  # The journal file (and SQLite) live on one file system: flock there.
  os.makedirs(workdir, exist_ok=True)
  descriptor = os.open(os.path.join(workdir, _MUTEX_FILE),
                       os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
  try:
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    yield
  finally:
    os.close(descriptor)  # Releases the lock.


class Worker:
  """This process as a worker of the study: a held lock file, refreshed.

  Args:
    workdir: The study's directory.
  """

  def __init__(self, workdir):
    self.host = socket.gethostname()
    self.name = f'{self.host}:{os.getpid()}:{uuid.uuid4().hex[:6]}'
    directory = os.path.join(workdir, _WORKERS)
    os.makedirs(directory, exist_ok=True)
    self.path = worker_file(workdir, self.name)
    self._lock = workdir_lib.Lock(self.path)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._refresh, daemon=True)
    self._thread.start()

  def _refresh(self):
    while not self._stop.wait(HEARTBEAT_SECONDS):
      with contextlib.suppress(OSError):
        os.utime(self.path)

  def close(self, running_trial=False):
    """Releases the lock; the file stays if this worker left a trial
    RUNNING (an exception), so that the next worker sees it is gone."""
    self._stop.set()
    self._lock.release()
    if not running_trial:
      with contextlib.suppress(OSError):
        os.remove(self.path)


def worker_file(workdir, name):
  safe = re.sub(r'[^A-Za-z0-9_.-]', '_', name)
  return os.path.join(workdir, _WORKERS, f'{safe}.lock')


def is_dead(workdir, name, grace_seconds):
  """Whether the worker `name` is known to be gone (False if unknown).

  Same host: its lock file is not locked (the OS released it when the
  process ended). Other hosts (a shared file system): the file was not
  refreshed for `grace_seconds`.
  """
  if not name:
    return False
  path = worker_file(workdir, name)
  if not os.path.exists(path):
    # Closed cleanly, or of another workdir (a study in a database shared
    # by workers with their own workdirs): the heartbeat tells.
    return False
  if name.split(':')[0] != socket.gethostname():
    try:
      return time.time() - os.stat(path).st_mtime > grace_seconds
    except OSError:
      return False
  try:
    lock = workdir_lib.Lock(path)
  except errors.WorkdirError:
    return False  # Held: alive.
  lock.release()
  return True


def forget(workdir, name):
  """Removes the lock file of a worker found dead (its trial requeued)."""
  with contextlib.suppress(OSError):
    os.remove(worker_file(workdir, name))
