r"""Soak test of resuming: faults at random moments of the smoke run.

Not part of the test suite (it runs for minutes). For `--minutes`, it trains
the smoke config (tfds mock data, through `tests/mock_cli.py` as the tests
do) in a fresh workdir, again and again, and interrupts each attempt at a
random moment with one fault:

  kill9     SIGKILL after a random delay (a crash, an OOM kill);
  sigterm   SIGTERM after a random delay (preemption: expect exit 143, or
            the default action outside training);
  disk      the workdir on a small tmpfs filled up to leave a random few
            hundred MiB (expect a clean `error:` line, exit 2), then freed.

It reruns the same command until the run finishes, then checks the episode:
the final backup equals an uninterrupted run's (atol 1e-5, as
tests/main_test.py does after kill -9), one export version, two history
rows, a valid metrics.json, and no temporary file left. A fault counts as
survived when it hit (it made the attempt fail) and its episode passes; any
failing check or unexpected exit status is printed and makes the exit status
1.

    python benchmarks/soak.py --minutes=10

The disk faults need root (to mount a tmpfs); without it they are skipped,
and the summary says so.
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TMPFS_MIB = 1200
# Free space left on the tmpfs in a disk fault; a backup of the smoke model
# is ~181 MiB and needs twice that free.
_FREE_MIB_CHOICES = (60, 250, 420, 600)


def _command(workdir):
  return [sys.executable, os.path.join(_REPO, 'tests', 'mock_cli.py'),
          '--config=configs/cifar10_resnet50.py:smoke', f'--workdir={workdir}']


def _env():
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='')


def _start(workdir, log):
  return subprocess.Popen(_command(workdir), cwd=_REPO, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=log)


def _run_to_end(workdir, log_path):
  with open(log_path, 'a') as log:
    process = _start(workdir, log)
    return process.wait(timeout=900)


def _latest_backup(workdir):
  directory = os.path.join(workdir, 'checkpoints')
  with open(os.path.join(directory, 'checkpoint.json')) as file:
    return os.path.join(directory, json.load(file)['file'])


def _arrays(path):
  arrays = {}
  with h5py.File(path, 'r') as file:
    file.visititems(lambda name, item: arrays.__setitem__(name, item[()])
                    if isinstance(item, h5py.Dataset) else None)
  return arrays


def _temporary_files(workdir):
  return [os.path.join(directory, name)
          for directory, folders, files in os.walk(workdir)
          for name in folders + files
          if name.startswith(('.tmp-', 'tmp-')) or name.endswith('.tmp')]


def _check_episode(workdir, reference):
  """Returns the problems of a finished episode (empty when it passed)."""
  problems = []
  got = _arrays(_latest_backup(workdir))
  if got.keys() != reference.keys():
    problems.append('backup layout differs from the reference')
  else:
    for name, want in reference.items():
      if not np.allclose(got[name], want, atol=1e-5, rtol=0):
        problems.append(f'{name} differs from the uninterrupted run by '
                        f'{np.max(np.abs(got[name] - want)):.3g}')
  with open(os.path.join(workdir, 'metrics.json')) as file:
    try:
      json.loads(file.read(), parse_constant=lambda name: 1 / 0)
    except (ValueError, ZeroDivisionError):
      problems.append('metrics.json is not strict JSON')
  versions = sorted(os.listdir(os.path.join(workdir, 'export')))
  if versions != ['1']:
    problems.append(f'export versions {versions}, expected ["1"]')
  with open(os.path.join(workdir, 'history.csv')) as file:
    epochs = [line.split(',')[0] for line in file.read().splitlines()[1:]]
  if epochs != ['0', '1']:
    problems.append(f'history.csv epochs {epochs}, expected ["0", "1"]')
  leftovers = _temporary_files(workdir)
  if leftovers:
    problems.append(f'temporary files left: {leftovers}')
  return problems


class _Tmpfs:
  """A small tmpfs to fill up, when this process may mount one."""

  def __init__(self, root):
    self.path = os.path.join(root, 'tmpfs')
    os.makedirs(self.path)
    self.mounted = False
    if os.geteuid() == 0:
      result = subprocess.run(
          ['mount', '-t', 'tmpfs', '-o', f'size={_TMPFS_MIB}m', 'tmpfs',
           self.path], capture_output=True, text=True)
      self.mounted = result.returncode == 0

  def fill(self, free_mib):
    """Leaves about `free_mib` MiB free; returns the filler's path."""
    filler = os.path.join(self.path, 'filler')
    free = shutil.disk_usage(self.path).free - free_mib * 2**20
    with open(filler, 'wb') as file:
      chunk = b'\0' * 2**20
      for _ in range(max(0, free) // 2**20):
        file.write(chunk)
    return filler

  def clear(self):
    for name in os.listdir(self.path):
      path = os.path.join(self.path, name)
      if os.path.isdir(path):
        shutil.rmtree(path)
      else:
        os.remove(path)

  def unmount(self):
    if self.mounted:
      subprocess.run(['umount', self.path], check=False)


def _fault(kind, workdir, rng, log_path, tmpfs, longest_seconds):
  """Runs one attempt with one fault.

  Returns:
    `(exit status, whether it was expected, detail, whether a fault hit)`.
  """
  with open(log_path, 'a') as log:
    log.write(f'\n===== {kind} =====\n')
    log.flush()
    if kind == 'disk':
      free_mib = rng.choice(_FREE_MIB_CHOICES)
      filler = tmpfs.fill(free_mib)
      try:
        status = _start(workdir, log).wait(timeout=900)
      finally:
        os.remove(filler)
      return status, status in (0, 2), f'{free_mib} MiB free', status != 0
    process = _start(workdir, log)
    delay = rng.uniform(1.0, longest_seconds)
    try:
      status = process.wait(timeout=delay)
      return status, status == 0, f'finished before {delay:.1f} s', False
    except subprocess.TimeoutExpired:
      pass
    process.send_signal(signal.SIGKILL if kind == 'kill9' else
                        signal.SIGTERM)
    status = process.wait(timeout=900)
    expected = ((-signal.SIGKILL, 0) if kind == 'kill9' else
                (143, -signal.SIGTERM, 0))
    # Exit 0: the signal came as the process was ending anyway.
    return status, status in expected, f'after {delay:.1f} s', status != 0


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--minutes', type=float, default=30.0)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--root', default=None,
                      help='Scratch directory (default: a new temp dir).')
  args = parser.parse_args()
  rng = random.Random(args.seed)
  root = args.root or tempfile.mkdtemp(prefix='keras-sft-soak-')
  os.makedirs(root, exist_ok=True)
  log_path = os.path.join(root, 'soak.log')
  tmpfs = _Tmpfs(root)
  kinds = ['kill9', 'sigterm'] + (['disk'] if tmpfs.mounted else [])
  survived = {kind: 0 for kind in kinds}
  failures = []
  unexpected = []
  episodes = 0
  try:
    print(f'Scratch: {root}; log: {log_path}', flush=True)
    reference_dir = os.path.join(root, 'reference')
    start = time.time()
    if _run_to_end(reference_dir, log_path):
      sys.exit(f'The uninterrupted reference run failed: see {log_path}')
    reference = _arrays(_latest_backup(reference_dir))
    # Faults land anywhere in a run, its startup and export included.
    longest_seconds = 1.2 * (time.time() - start)
    print(f'Reference run: {time.time() - start:.0f} s', flush=True)
    deadline = time.time() + args.minutes * 60
    while time.time() < deadline:
      episodes += 1
      on_tmpfs = tmpfs.mounted and rng.random() < 0.3
      workdir = os.path.join(tmpfs.path if on_tmpfs else root,
                             f'episode-{episodes}')
      faults = {kind: 0 for kind in kinds}
      status = None
      while status != 0 or not os.path.exists(
          os.path.join(workdir, 'metrics.json')):
        if time.time() > deadline and status is not None:
          break
        kind = rng.choice([k for k in kinds if on_tmpfs or k != 'disk'])
        status, ok, detail, hit = _fault(kind, workdir, rng, log_path, tmpfs,
                                         longest_seconds)
        faults[kind] += hit
        print(f'episode {episodes} {kind} ({detail}): exit {status}',
              flush=True)
        if not ok:
          unexpected.append((episodes, kind, status, detail))
      if status != 0:  # Out of time: finish it without faults.
        status = _run_to_end(workdir, log_path)
      problems = (_check_episode(workdir, reference) if status == 0 else
                  [f'the final rerun exited {status}'])
      if problems:
        failures.append((episodes, problems))
        print(f'episode {episodes} FAILED: {problems}', flush=True)
      else:
        for kind, count in faults.items():
          survived[kind] += count
        print(f'episode {episodes} passed: {faults}', flush=True)
      if on_tmpfs:
        tmpfs.clear()
      else:
        shutil.rmtree(workdir, ignore_errors=True)
  finally:
    tmpfs.unmount()
  total = sum(survived.values())
  print(f'\n{args.minutes:g} minutes, {episodes} episodes: {total} faults '
        f'survived ({survived}); {len(failures)} episodes failed; '
        f'{len(unexpected)} unexpected exit statuses {unexpected}.')
  if not tmpfs.mounted:
    print('Disk-full faults skipped: no tmpfs could be mounted (needs root).')
  sys.exit(1 if failures or unexpected else 0)


if __name__ == '__main__':
  main()
