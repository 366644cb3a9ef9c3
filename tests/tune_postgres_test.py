"""Two workers share one study in a real PostgreSQL server, started here
(initdb + pg_ctl into a temporary directory, on a loopback port, as a
non-root user: PostgreSQL refuses to run as root)."""

import os
import pwd
import shutil
import socket
import subprocess
import tempfile

import optuna
import pytest

import tune_fixtures

TRIALS = 2


def _binary(name):
  found = shutil.which(name)
  if found:
    return found
  for version in sorted(os.listdir('/usr/lib/postgresql'), reverse=True) if (
      os.path.isdir('/usr/lib/postgresql')) else []:
    path = os.path.join('/usr/lib/postgresql', version, 'bin', name)
    if os.path.exists(path):
      return path
  return None


def _free_port():
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


@pytest.fixture
def postgres_url():
  initdb, pg_ctl = _binary('initdb'), _binary('pg_ctl')
  if not (initdb and pg_ctl):
    pytest.skip('PostgreSQL binaries (initdb, pg_ctl) are not installed: '
                'apt-get install postgresql')
  user = None
  if os.geteuid() == 0:
    try:
      user = pwd.getpwnam('postgres')
    except KeyError:
      pytest.skip('Running as root and there is no "postgres" user to run '
                  'the server as (PostgreSQL refuses root).')
  # Not under pytest's tmp_path: its parents are private to root, and the
  # server user must reach its data directory.
  root = tempfile.mkdtemp(prefix='keras-sft-pg-')
  data = os.path.join(root, 'data')
  os.mkdir(data, 0o700)
  if user:
    os.chown(root, user.pw_uid, user.pw_gid)
    os.chown(data, user.pw_uid, user.pw_gid)
  port = _free_port()

  def as_server_user(*command):
    return subprocess.run(list(command), check=True, capture_output=True,
                          text=True, timeout=120,
                          user=user.pw_uid if user else None,
                          group=user.pw_gid if user else None,
                          cwd=root)

  try:
    as_server_user(initdb, '-D', data, '-U', 'tune', '--auth=trust',
                   '-E', 'UTF8')
  except subprocess.CalledProcessError as error:
    shutil.rmtree(root, ignore_errors=True)
    raise AssertionError(f'initdb failed: {error.stderr}') from error
  as_server_user(pg_ctl, '-D', data, '-l', os.path.join(root, 'server.log'),
                 '-w', '-o', f'-p {port} -k {data} -c '
                 "listen_addresses=127.0.0.1", 'start')
  try:
    yield f'postgresql://tune@127.0.0.1:{port}/postgres'
  finally:
    as_server_user(pg_ctl, '-D', data, '-m', 'immediate', 'stop')
    shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_a_postgresql_study(tmp_path, postgres_url):
  directory = str(tmp_path)
  folder = tune_fixtures.write_folder(directory)
  space = tune_fixtures.write_space(directory)
  # Each worker has its own workdir, as on machines without a shared disk;
  # the study (named explicitly) is in the database.
  workers = [
      tune_fixtures.start(tune_fixtures.tune_command(
          os.path.join(directory, f'machine{index}'), folder, space,
          f'--trials={TRIALS}', f'--storage={postgres_url}',
          '--study_name=shared', '--final=none'))
      for index in range(2)]
  outputs = [worker.communicate(timeout=900)[0] for worker in workers]
  for worker, output in zip(workers, outputs):
    errors = [line for line in output.splitlines() if 'rror' in line]
    assert worker.returncode == 0, '\n'.join(errors[-20:]) + output[-3000:]
  study = optuna.load_study(study_name='shared', storage=postgres_url)
  assert len(study.trials) == TRIALS
  assert all(trial.state == optuna.trial.TrialState.COMPLETE
             for trial in study.trials)
  assert len({trial.user_attrs['worker'] for trial in study.trials}) == 2
  ran = sorted(name for index in range(2) for name in os.listdir(
      os.path.join(directory, f'machine{index}', 'trials')) if name.isdigit())
  assert ran == [str(number) for number in range(TRIALS)]
