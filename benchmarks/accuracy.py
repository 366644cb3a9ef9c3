"""Accuracy on real images: keras-sft beside the seed's PyTorch loop.

Real data that can be had offline: Fashion-MNIST from Debian
(`dataset-fashion-mnist`, idx .gz files under /usr/share/datasets/
fashion-mnist/). Each 28x28 grayscale image is zero-padded by 2 pixels on
each side to 32x32 (Fashion-MNIST's background is 0, so no pixel is
resampled) and repeated over 3 channels, then written as a PNG into the
`folder:` layout keras-sft reads (PATH/{train,test}/<class>/<index>.png, the
index being the image's position in the idx file). Subsets are balanced: the
first k images of each class, in file order. They are cached under
--data_dir and written only once.

Rows:
  1. From scratch on the same images, epochs and batch size: keras-sft with
     its defaults (`configs/default.py`, weights=None, 32px) through its
     command line, with the seed loop's augmentation (none:
     random_crop=False, random_flip=False), and with that and a higher
     learning rate (SCRATCH_ROWS), vs the seed's PyTorch loop (`seed_loop` below: torchvision
     ResNet50, SGD lr 1e-3 momentum 0.9, CE, ToTensor + ImageNet Normalize,
     evaluated in eval mode). Each in its own process; wall time is the whole
     process, start to exit (imports, data loading, training, evaluation).
  2. A fine-tuning proxy: keras-sft pretrains ResNet50 on classes 0-4, its
     backbone is saved as a Keras ResNet50 no-top weights file, and classes
     5-9 (--finetune_per_class train images each, all their test images) are
     learned from scratch, fine-tuned (defaults), head-only
     (`freeze_until=conv5`: the whole backbone frozen, its BatchNorm in
     inference mode, only the Dense head trains), with
     `batch_norm=frozen` and without augmentation (PROXY_ROWS); then one row
     per recipe switch of issue #23, one switch at a time against the
     fine-tuned defaults: `weight_decay_target=pretrained` (L2-SP, at the
     default λ), `layer_decay=0.7`, `clip_global_norm=1.0`,
     `gradient_accumulation_steps=2`, `random_erasing_probability=0.25`,
     `calibration_split=val` and, on the imbalanced variant only,
     `class_weight=balanced` and `sampling=balanced` (on balanced data the
     first is the identity, every class weight 1, and the second only
     reorders the same distribution, so their rows there would measure the
     seed, not the switch).
     Variants (--proxy_variants): `balanced` (the fine-tuning train set has
     --finetune_per_class images per class) and `imbalanced` (its per-class
     counts fall geometrically from --finetune_per_class for class 5 to
     1/--imbalance_ratio of it for class 9: 100, 56, 32, 18, 10). The test
     split is balanced in both. Both share the pretrained backbone.
     Every fine-tuning root also holds a `val/` split
     (--finetune_val_per_class images per class, balanced, the train idx
     file's images after the first --finetune_per_class of each class, so
     never a train image), read only by the `calibration_split=val` row: it
     fits the temperature there, and the other rows read train/ and test/
     exactly as before. Each table gives top-1, macro-F1 and the expected
     calibration error on the test split (15 bins; `ECE after T`: with the
     fitted temperature, the calibration row only), read from each run's
     metrics.json `report`.

Timing on a shared machine: every timed process records the share of the
CPUs other processes took while it ran (`other load`); --wait_idle_seconds
waits for an idle machine before each. Other work slows the seed loop far
more than keras-sft (benchmarks/ACCURACY.md); a likely cause is that
PyTorch's OpenMP threads meet at a barrier after every op, so one
descheduled thread stalls all of them, where TensorFlow's thread pool lets a
free core take the work.

Two settings differ from configs/default.py in every keras-sft run, neither
of which changes the trained weights: `export=False` (no SavedModel at the
end; the seed loop writes none) and `eval_every_epochs=E` (evaluate after
the last epoch only, as the seed loop does; keras-sft then passes over the
test images three times: that validation, `evaluate` and the report).

Setup (once): `bash benchmarks/setup_accuracy.sh PYTHON` or `--setup`
(installs torch into that Python's environment; to keep it out of
keras-sft's, install it in another venv and pass --torch_python=ITS_PYTHON).
Usage:
  PYTHONPATH=. python benchmarks/accuracy.py [--quick] [--out=FILE.json]
`--quick` proves the plumbing on a few hundred images in one epoch (its
numbers mean nothing); without torch it skips the seed loop's row. Its one
proxy row is `calibration_split=val` on the imbalanced variant, the row
that goes through the most of the harness (imbalanced and val exports, the
temperature, every column), so CI runs no more processes than before.
Rows are chosen by name or by work-directory name (the first field of
SCRATCH_ROWS / PROXY_ROWS; names holding a comma only that way), e.g.
`--rows=proxy --proxy_rows=finetune_defaults,finetune_l2sp`.
"""

import argparse
import csv
import datetime
import gzip
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
IDX_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
# Fashion-MNIST's class names, as folder names; sorted, they keep the
# dataset's label order (both keras-sft and torchvision sort class folders).
CLASS_NAMES = ('0_tshirt_top', '1_trouser', '2_pullover', '3_dress',
               '4_coat', '5_sandal', '6_shirt', '7_sneaker', '8_bag',
               '9_ankle_boot')
IMAGE_SIZE = 32
PAD = (IMAGE_SIZE - 28) // 2

# Defaults sized for ~20 minutes on this project's 2-core CPU.
FULL = dict(train_images=10_000, test_images=2_000, epochs=5, batch_size=128,
            pretrain_per_class=1_000, pretrain_test_per_class=200,
            pretrain_epochs=5, finetune_per_class=100,
            finetune_test_per_class=None, finetune_epochs=20,
            finetune_batch_size=64, finetune_val_per_class=100)
QUICK = dict(train_images=200, test_images=100, epochs=1, batch_size=64,
             pretrain_per_class=40, pretrain_test_per_class=10,
             pretrain_epochs=1, finetune_per_class=20,
             finetune_test_per_class=20, finetune_epochs=1,
             finetune_batch_size=32, finetune_val_per_class=10)
# The augmentation the seed loop uses: none.
NO_AUGMENTATION = ['--config.random_crop=False', '--config.random_flip=False']
SCRATCH_ROWS = {
    # name: (workdir, extra keras-sft flags)
    'keras-sft (defaults)': ('scratch_keras_sft', []),
    'keras-sft, no augmentation (as the seed loop)': (
        'scratch_no_augmentation', NO_AUGMENTATION),
    'keras-sft, no augmentation, learning_rate=0.03': (
        'scratch_no_augmentation_lr0.03',
        [*NO_AUGMENTATION, '--config.learning_rate=0.03']),
}
QUICK_SCRATCH_ROWS = ('keras-sft (defaults)',)
PROXY_ROWS = {
    # name: (workdir, uses the pretrained backbone, extra keras-sft flags)
    'from scratch': ('finetune_scratch', False, []),
    'fine-tuned': ('finetune_defaults', True, []),
    'head-only (freeze_until=conv5)': ('finetune_head_only', True,
                                       ['--config.freeze_until=conv5']),
    'batch_norm=frozen': ('finetune_bn_frozen', True,
                          ['--config.batch_norm=frozen']),
    'fine-tuned, no augmentation': ('finetune_no_augmentation', True,
                                    NO_AUGMENTATION),
    # Issue #23's switches, each alone on top of the fine-tuned defaults.
    'weight_decay_target=pretrained (L2-SP)': (
        'finetune_l2sp', True, ['--config.weight_decay_target=pretrained']),
    'layer_decay=0.7': ('finetune_layer_decay0.7', True,
                        ['--config.layer_decay=0.7']),
    'clip_global_norm=1.0': ('finetune_clip1.0', True,
                             ['--config.clip_global_norm=1.0']),
    'gradient_accumulation_steps=2': (
        'finetune_accumulate2', True,
        ['--config.gradient_accumulation_steps=2']),
    'random_erasing_probability=0.25': (
        'finetune_random_erasing0.25', True,
        ['--config.random_erasing_probability=0.25']),
    # Fits T on the root's val/ split (see export_folder); only this row
    # reads it.
    'calibration_split=val': ('finetune_calibrated', True,
                              ['--config.calibration_split=val']),
    'class_weight=balanced': ('finetune_class_weight_balanced', True,
                              ['--config.class_weight=balanced']),
    'sampling=balanced': ('finetune_sampling_balanced', True,
                          ['--config.sampling=balanced']),
}
# Rows run on the imbalanced variant only: on balanced data class_weight=
# 'balanced' weights every class 1 (the fine-tuned row again) and balanced
# sampling draws the same distribution in another order.
IMBALANCED_ONLY_PROXY_ROWS = ('class_weight=balanced', 'sampling=balanced')
QUICK_PROXY_ROWS = ('calibration_split=val',)
PROXY_VARIANTS = ('balanced', 'imbalanced')
QUICK_PROXY_VARIANTS = ('imbalanced',)
# Where each variant's results go in the JSON (balanced: the key it always
# had) and its runs under --work_dir (balanced: the directories they always
# had).
PROXY_RESULTS_KEYS = dict(balanced='finetune_proxy',
                          imbalanced='finetune_proxy_imbalanced')
PROXY_SUBDIRECTORIES = dict(balanced='', imbalanced='imbalanced')
TARGET_ERROR_RATIO = 0.75
TARGET_WALL_RATIO = 1.0


# --- Data -------------------------------------------------------------------


def read_idx(path):
  """Reads a gzipped idx file (the MNIST format) into a numpy array."""
  with gzip.open(path, 'rb') as file:
    data = file.read()
  if data[:2] != b'\x00\x00' or data[2] != 0x08:
    raise ValueError(f'{path}: not an idx file of uint8 (magic {data[:4]!r}).')
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big')
                for i in range(ndim))
  array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if array.size != int(np.prod(shape)):
    raise ValueError(f'{path}: {array.size} values for shape {shape}.')
  return array.reshape(shape)


def load_split(source_dir, split):
  images_file, labels_file = IDX_FILES[split]
  images = read_idx(os.path.join(source_dir, images_file))
  labels = read_idx(os.path.join(source_dir, labels_file))
  if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
    raise ValueError(f'{split}: images {images.shape}, labels {labels.shape}')
  return images, labels


def select(labels, classes, per_class, skip=0):
  """Indices of the first `per_class` images of each class (None: all).

  Args:
    labels: The label of every image, in file order.
    classes: The labels to select.
    per_class: One count for every class, a sequence of counts aligned
      with `classes`, or None for all the images of each class.
    skip: Images of each class passed over first (a split taken after
      another: e.g. the val split after the train split's images).

  Returns:
    The sorted indices.
  """
  if per_class is None or np.isscalar(per_class):
    per_class = [per_class] * len(classes)
  if len(per_class) != len(classes):
    raise ValueError(f'{len(per_class)} counts for {len(classes)} classes')
  chosen = []
  for label, count in zip(classes, per_class):
    where = np.flatnonzero(labels == label)[skip:]
    if count is not None:
      if len(where) < count:
        raise ValueError(f'class {label} has {len(where)} images after the '
                         f'first {skip}, {count} asked')
      where = where[:count]
    chosen.extend(where.tolist())
  return sorted(chosen)


def imbalanced_counts(largest, num_classes, ratio):
  """Per-class counts falling geometrically from `largest` to `largest/ratio`.

  Class i (0-based) of n gets round(largest · ratio^(-i / (n - 1))), at
  least 1: with 100, 5 and 10, [100, 56, 32, 18, 10].
  """
  if num_classes < 2:
    return [largest]
  return [max(1, int(round(largest * ratio ** (-index / (num_classes - 1)))))
          for index in range(num_classes)]


def to_rgb32(image):
  padded = np.pad(image, PAD)
  return np.repeat(padded[:, :, None], 3, axis=2)


def export_folder(source_dir, data_dir, name, classes, train_per_class,
                  test_per_class, val_per_class=None):
  """Writes (once) a `folder:` dataset of the given classes; returns its path.

  Layout: <data_dir>/<name>/{train,test[,val]}/<class>/<idx-file index>.png,
  32x32 RGB PNGs. A `.complete` file holding the spec marks a finished
  export; an unfinished or different one is rewritten.

  Args:
    source_dir: The Fashion-MNIST idx files.
    data_dir: Where exports go.
    name: The export's folder name.
    classes: The labels exported.
    train_per_class: Train images per class (the first of each class in the
      train idx file): one count, one per class (aligned with `classes`),
      or None for all.
    test_per_class: Test images per class, likewise (test idx file).
    val_per_class: None (no val/ split), or the images per class of a val/
      split taken from the train idx file after the largest train count of
      every class, so it shares no image with train/.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  root = os.path.join(data_dir, name)
  if train_per_class is not None and not np.isscalar(train_per_class):
    train_per_class = [int(count) for count in train_per_class]
  spec = dict(source=os.path.abspath(source_dir), classes=list(classes),
              train_per_class=train_per_class, test_per_class=test_per_class,
              transform=f'pad 28->{IMAGE_SIZE} with 0, gray->RGB')
  # (source split, per-class counts, images of each class passed over)
  splits = dict(train=('train', train_per_class, 0),
                test=('test', test_per_class, 0))
  if val_per_class is not None:
    if train_per_class is None:
      raise ValueError('a val split needs a train count (None takes all '
                       'the train images)')
    skip = int(np.max(train_per_class))
    spec.update(val_per_class=val_per_class, val_after_first=skip)
    splits['val'] = ('train', val_per_class, skip)
  marker = os.path.join(root, '.complete')
  if os.path.exists(marker):
    with open(marker) as file:
      if json.load(file) == spec:
        return root
  shutil.rmtree(root, ignore_errors=True)
  counts = {}
  for split, (source, per_class, skip) in splits.items():
    images, labels = load_split(source_dir, source)
    chosen = select(labels, classes, per_class, skip)
    for label in classes:
      os.makedirs(os.path.join(root, split, CLASS_NAMES[label]))
    for index in chosen:
      Image.fromarray(to_rgb32(images[index])).save(os.path.join(
          root, split, CLASS_NAMES[labels[index]], f'{index:05d}.png'))
    counts[split] = len(chosen)
  with open(marker, 'w') as file:
    json.dump(spec, file)
  print(f'Wrote {" / ".join(f"{n} {s}" for s, n in counts.items())} PNGs to '
        f'{root}', flush=True)
  return root


# --- The seed's PyTorch loop -------------------------------------------------


def seed_loop(root, epochs, batch_size, seed):
  """The loop keras-sft replaces, as the seed wrote it (run in its own process)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  from torchvision import transforms  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  transform = transforms.Compose([
      transforms.ToTensor(),
      transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
  train = torchvision.datasets.ImageFolder(f'{root}/train', transform)
  test = torchvision.datasets.ImageFolder(f'{root}/test', transform)
  model = torchvision.models.resnet50(weights=None)
  model.fc = torch.nn.Linear(model.fc.in_features, len(train.classes))
  optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
  criterion = torch.nn.CrossEntropyLoss()
  start = time.perf_counter()
  for _ in range(epochs):
    model.train()
    for images, labels in torch.utils.data.DataLoader(
        train, batch_size=batch_size, shuffle=True):
      optimizer.zero_grad()
      criterion(model(images), labels).backward()
      optimizer.step()
  train_seconds = time.perf_counter() - start
  model.eval()
  correct = 0
  with torch.no_grad():
    for images, labels in torch.utils.data.DataLoader(test,
                                                      batch_size=batch_size):
      correct += (model(images).argmax(1) == labels).sum().item()
  return dict(top1=correct / len(test), num_train=len(train),
              num_test=len(test), train_seconds=train_seconds,
              torch_threads=torch.get_num_threads(),
              torch_version=torch.__version__,
              torchvision_version=torchvision.__version__)


# --- Running things in subprocesses -----------------------------------------


def _env():
  # The checkout this file belongs to, whatever `pip install -e` points at.
  path = os.environ.get('PYTHONPATH')
  return dict(os.environ, PYTHONPATH=REPO_ROOT + (os.pathsep + path
                                                  if path else ''),
              TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='')


def _cpu_seconds():
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def _machine_busy_seconds():
  """CPU seconds all processes of this machine spent busy (/proc/stat)."""
  try:
    with open('/proc/stat') as file:
      fields = [int(v) for v in file.readline().split()[1:]]
  except (OSError, ValueError):
    return float('nan')
  # user nice system idle iowait irq softirq steal ...: all but idle, iowait.
  busy = sum(fields[:8]) - fields[3] - fields[4]
  return busy / os.sysconf('SC_CLK_TCK')


# The interpreter that runs the seed loop (--torch_python): torch and
# torchvision may live in their own environment.
TORCH_PYTHON = sys.executable
# Before each timed process: wait up to this many seconds for the machine to
# be idle (set by --wait_idle_seconds).
WAIT_IDLE_SECONDS = 0.0


def wait_for_idle(max_seconds, window=10.0, threshold=0.1):
  """Waits until other processes use < threshold of the CPUs over `window` s.

  Returns the seconds waited (at most about `max_seconds`).
  """
  start = time.perf_counter()
  while time.perf_counter() - start < max_seconds:
    busy = _machine_busy_seconds()
    time.sleep(window)
    if (_machine_busy_seconds() - busy) / (window * os.cpu_count()) < threshold:
      break
  return time.perf_counter() - start


def _run(command, log_path):
  """Runs `command`; returns (timing dict, stdout). Fails with the log tail.

  Timing: the process's wall seconds, its CPU seconds (user + system, all
  threads), and `other_cpu_fraction`: the CPU time other processes of this
  machine took while it ran, as a fraction of all cores' time (0: it had the
  machine to itself; on 2 cores, 0.5 is one core taken). Wall times under
  other work are not comparable.
  """
  waited = wait_for_idle(WAIT_IDLE_SECONDS) if WAIT_IDLE_SECONDS else 0.0
  cpu = _cpu_seconds()
  busy = _machine_busy_seconds()
  start = time.perf_counter()
  with open(log_path, 'w') as log:
    result = subprocess.run(command, cwd=REPO_ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=log, text=True)
  wall = time.perf_counter() - start
  cpu = _cpu_seconds() - cpu
  other = max(0.0, _machine_busy_seconds() - busy - cpu)
  timing = dict(wall_seconds=wall, cpu_seconds=cpu,
                other_cpu_fraction=other / (wall * os.cpu_count()),
                waited_for_idle_seconds=waited)
  if timing['other_cpu_fraction'] > 0.05:
    print(f'  note: other processes took {timing["other_cpu_fraction"]:.0%} of '
          'the CPU during this run: its wall time is not comparable',
          flush=True)
  if result.returncode:
    with open(log_path) as log:
      tail = log.read()[-4000:]
    raise RuntimeError(f'{" ".join(command)} exited {result.returncode} after '
                       f'{wall:.0f} s; log {log_path}:\n{tail}')
  return timing, result.stdout


def run_keras_sft(root, workdir, epochs, batch_size, seed, weights=None,
                  extra=(), keep=False):
  """Trains and evaluates through keras-sft's command line; a result dict."""
  command = [
      sys.executable, '-m', 'keras_sft.main', '--config=configs/default.py',
      f'--workdir={workdir}', f'--config.dataset=folder:{root}',
      f'--config.weights={weights}', f'--config.image_size={IMAGE_SIZE}',
      f'--config.global_batch_size={batch_size}',
      f'--config.num_epochs={epochs}', f'--config.eval_every_epochs={epochs}',
      f'--config.seed={seed}', '--config.export=False', *extra]
  if os.path.exists(workdir):
    # keras-sft would resume (or skip) the run there: no fresh measurement.
    raise FileExistsError(f'{workdir} exists: give a new --work_dir.')
  print('  $', ' '.join(command[1:]), flush=True)
  timing, _ = _run(command, workdir + '.log')
  with open(os.path.join(workdir, 'metrics.json')) as file:
    metrics = json.load(file)
  if not keep:
    shutil.rmtree(os.path.join(workdir, 'checkpoints'), ignore_errors=True)
  # Training accuracy of the last epoch (batch statistics in BatchNorm)
  # beside the eval top-1 (moving statistics): a gap shows stale statistics.
  with open(os.path.join(workdir, 'history.csv')) as file:
    last = list(csv.DictReader(file))[-1]
  report = metrics['report']
  # ECE on the test split with the network's probabilities, and (only with
  # calibration_split) with the temperature fitted on that split.
  calibration = report['calibration']
  return dict(top1=report['top1'], macro_f1=report['macro_f1'],
              balanced_accuracy=report['balanced_accuracy'],
              ece=calibration['ece'],
              ece_calibrated=calibration.get('ece_calibrated'),
              temperature=calibration.get('temperature'), **timing,
              train_accuracy_last_epoch=float(last['accuracy']),
              steps=metrics['step'],
              num_test=int(np.sum(report['confusion_matrix'])),
              command=command)


def run_seed_loop(root, work_dir, epochs, batch_size, seed):
  args = json.dumps(dict(root=root, epochs=epochs, batch_size=batch_size,
                         seed=seed))
  command = [TORCH_PYTHON, os.path.abspath(__file__), f'--_seed_loop={args}']
  timing, stdout = _run(command, os.path.join(work_dir, 'seed_loop.log'))
  return dict(json.loads(stdout.strip().splitlines()[-1]), **timing,
              command=command)


def _extract(pre_dir, weights_file, work_dir):
  timing, stdout = _run(
      [sys.executable, os.path.abspath(__file__),
       f'--_extract_backbone={json.dumps([pre_dir, weights_file])}'],
      os.path.join(work_dir, 'extract_backbone.log'))
  return dict(json.loads(stdout.strip().splitlines()[-1]), **timing)


def extract_backbone(workdir, path):
  """Saves the ResNet50 backbone of a keras-sft run as a no-top weights file.

  Run in a subprocess. Checks that the file loads into
  `keras.applications.ResNet50(include_top=False, weights=path)` with the
  same values.
  """
  import keras  # pylint: disable=g-import-not-at-top
  from keras_sft.export import restore  # pylint: disable=g-import-not-at-top
  model, _, _, checkpoint = restore.restore_run_model(workdir, 'last')
  backbone = model.network.get_layer('resnet50')
  backbone.save_weights(path)
  plain = keras.applications.ResNet50(
      include_top=False, weights=path,
      input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3))
  mismatched = [a.path for a, b in zip(backbone.weights, plain.weights)
                if not np.array_equal(a.numpy(), b.numpy())]
  if len(backbone.weights) != len(plain.weights) or mismatched:
    raise RuntimeError(f'{path} does not load back into ResNet50: '
                       f'{len(backbone.weights)} vs {len(plain.weights)} '
                       f'weights, mismatched {mismatched[:5]}')
  return dict(checkpoint=checkpoint, weights_file=path,
              num_weights=len(plain.weights))


# --- The benchmark -----------------------------------------------------------


def machine():
  name = platform.processor()
  try:
    for line in subprocess.run(['lscpu'], capture_output=True,
                               text=True).stdout.splitlines():
      if line.startswith('Model name:'):
        name = line.split(':', 1)[1].strip()
        break
  except OSError:
    pass
  versions = {}
  for package in ('tensorflow', 'keras', 'torch', 'torchvision', 'numpy'):
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = None
  git = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO_ROOT,
                       capture_output=True, text=True).stdout.strip()
  return dict(cpu=name, cpus=os.cpu_count(), python=platform.python_version(),
              platform=platform.platform(), versions=versions,
              git_commit=git or None)


def _ratio(a, b):
  return a / b if b else float('nan')


def _attempt(label, function, *args, **kwargs):
  """`function(...)`, or {'error': ...} when its process failed.

  One failed run (e.g. a package broken under the shared venv mid-run)
  costs its row, not the rows measured before and after it.
  """
  try:
    return function(*args, **kwargs)
  except (RuntimeError, OSError, ValueError) as error:
    print(f'  {label}: FAILED: {str(error)[-1500:]}', flush=True)
    return dict(error=str(error)[-4000:])


def _ok(row):
  return bool(row) and 'error' not in row


def _number(row, key):
  """`row[key]` to 4 decimals; '' when the row has no such value."""
  value = row.get(key)
  return '' if value is None else f'{value:.4f}'


def choose_rows(text, rows, default):
  """The row names `--scratch_rows`/`--proxy_rows` choose (None: `default`).

  Args:
    text: A comma list of row names or work-directory names (the first
      field of each entry of `rows`; the only way to name a row whose name
      holds a comma).
    rows: SCRATCH_ROWS or PROXY_ROWS.
    default: The names chosen when `text` is empty.

  Raises:
    ValueError: an unknown name, naming the valid ones.
  """
  if not text:
    return tuple(default)
  by_directory = {entry[0]: name for name, entry in rows.items()}
  chosen = []
  for token in text.split(','):
    token = token.strip()
    if token in rows:
      chosen.append(token)
    elif token in by_directory:
      chosen.append(by_directory[token])
    else:
      raise ValueError(
          f'Unknown row {token!r}. Name rows by their work directory: '
          f'{", ".join(by_directory)} (or by a name without a comma).')
  return tuple(chosen)


def _table(title, rows, reference, reference_name):
  lines = [title,
           f'| row | top-1 | top-1 error | error ratio vs {reference_name} '
           '| macro-F1 | ECE | ECE after T | wall s | wall ratio | CPU s '
           '| other load |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  if not _ok(reference):
    reference = None
  for name, row in rows:
    if not _ok(row):
      lines.append(f'| {name} | FAILED | | | | | | | | | |')
      continue
    error = 1.0 - row['top1']
    ref_error = 1.0 - reference['top1'] if reference else None
    if reference:
      ratios = (f'{_ratio(error, ref_error):.2f}',
                f'{_ratio(row["wall_seconds"], reference["wall_seconds"]):.2f}')
    else:
      ratios = ('n/a', 'n/a')
    lines.append(f'| {name} | {row["top1"]:.4f} | {error:.4f} | {ratios[0]} '
                 f'| {_number(row, "macro_f1")} | {_number(row, "ece")} '
                 f'| {_number(row, "ece_calibrated")} '
                 f'| {row["wall_seconds"]:.0f} | {ratios[1]} '
                 f'| {row["cpu_seconds"]:.0f} '
                 f'| {row["other_cpu_fraction"]:.0%} |')
  return '\n'.join(lines)


def benchmark(args):
  sizes = dict(QUICK if args.quick else FULL)
  for key in sizes:
    if getattr(args, key) is not None:
      sizes[key] = getattr(args, key)
  if TORCH_PYTHON == sys.executable:
    have_torch = importlib.util.find_spec('torch') is not None and (
        importlib.util.find_spec('torchvision') is not None)
  else:
    have_torch = subprocess.run(
        [TORCH_PYTHON, '-c', 'import torch, torchvision, numpy'],
        capture_output=True).returncode == 0
  if not have_torch and not (args.quick or args.skip_seed_loop):
    sys.exit('PyTorch/torchvision are not installed: run the setup step '
             'first, `bash benchmarks/setup_accuracy.sh '
             f'{sys.executable}` (or `{sys.argv[0]} --setup`), or pass '
             '--skip_seed_loop.')
  if not os.path.exists(os.path.join(args.source_dir, IDX_FILES['train'][0])):
    sys.exit(f'No Fashion-MNIST idx files in {args.source_dir}: run the setup '
             'step (`apt-get install dataset-fashion-mnist`) or pass '
             '--source_dir.')
  if sizes['train_images'] % 10 or sizes['test_images'] % 10:
    sys.exit('--train_images and --test_images must divide by 10 (balanced).')
  # Every choice checked before any work: a typo would otherwise surface
  # after the runs before it.
  try:
    scratch_rows = choose_rows(
        args.scratch_rows, SCRATCH_ROWS,
        QUICK_SCRATCH_ROWS if args.quick else SCRATCH_ROWS)
    proxy_rows = choose_rows(args.proxy_rows, PROXY_ROWS,
                             QUICK_PROXY_ROWS if args.quick else PROXY_ROWS)
  except ValueError as error:
    sys.exit(str(error))
  proxy_variants = (tuple(args.proxy_variants.split(','))
                    if args.proxy_variants else
                    QUICK_PROXY_VARIANTS if args.quick else PROXY_VARIANTS)
  unknown = set(proxy_variants) - set(PROXY_VARIANTS)
  if unknown or not proxy_variants:
    sys.exit(f'--proxy_variants must be a comma list of '
             f'{", ".join(PROXY_VARIANTS)}. Received: {args.proxy_variants!r}')
  if not args.imbalance_ratio >= 1:
    sys.exit(f'--imbalance_ratio must be >= 1. Received: '
             f'{args.imbalance_ratio}')
  train_counts = dict(
      balanced=[sizes['finetune_per_class']] * 5,
      imbalanced=imbalanced_counts(sizes['finetune_per_class'], 5,
                                   args.imbalance_ratio))
  started = datetime.datetime.now().astimezone()
  work_dir = args.work_dir or os.path.join(
      args.data_dir, 'runs', started.strftime('%Y%m%d-%H%M%S') +
      ('-quick' if args.quick else ''))
  os.makedirs(work_dir, exist_ok=True)
  seed, batch = args.seed, sizes['batch_size']
  results = dict(
      date=started.isoformat(timespec='seconds'), machine=machine(),
      mode='quick' if args.quick else 'full', seed=seed,
      flags=vars(args), sizes=sizes, work_dir=work_dir,
      data=dict(source=args.source_dir,
                transform=f'28x28 gray zero-padded to {IMAGE_SIZE}x'
                f'{IMAGE_SIZE}, repeated to RGB, PNG',
                selection='first k images of each class in idx order'),
      keras_sft_settings='configs/default.py, weights=None or the backbone '
      'file, image_size=32, export=False, eval_every_epochs=num_epochs')
  if args.quick:
    print('QUICK MODE: a few hundred images, 1 epoch. It proves the plumbing '
          'only; its accuracies mean nothing.', flush=True)
  print(f'Work dir: {work_dir}', flush=True)
  total_start = time.perf_counter()

  # Row 1: from scratch, both frameworks, same images, epochs and batch.
  row1 = {}
  if 'scratch' in args.rows:
    root = export_folder(
        args.source_dir, args.data_dir,
        f'fmnist32_c0-9_train{sizes["train_images"]}_test'
        f'{sizes["test_images"]}', range(10), sizes['train_images'] // 10,
        sizes['test_images'] // 10)
    print(f'Row 1: from scratch, {sizes["train_images"]} train images, '
          f'{sizes["epochs"]} epochs, batch {batch}, seed {seed}', flush=True)
    for name in scratch_rows:
      slug, extra = SCRATCH_ROWS[name]
      ours = row1[name] = _attempt(
          name, run_keras_sft, root, os.path.join(work_dir, slug),
          sizes['epochs'], batch, seed, extra=extra)
      if _ok(ours):
        print(f'  {name}: top-1 {ours["top1"]:.4f} in '
              f'{ours["wall_seconds"]:.0f} s', flush=True)
    if have_torch and not args.skip_seed_loop:
      theirs = row1['seed PyTorch loop'] = _attempt(
          'seed loop', run_seed_loop, root, work_dir, sizes['epochs'], batch,
          seed)
      if _ok(theirs):
        print(f'  seed loop: top-1 {theirs["top1"]:.4f} in '
              f'{theirs["wall_seconds"]:.0f} s', flush=True)
    else:
      row1['seed PyTorch loop'] = None
      print('  seed loop: SKIPPED (torch/torchvision not installed or '
            '--skip_seed_loop; run benchmarks/setup_accuracy.sh)', flush=True)
  results['from_scratch'] = row1

  # Row 2: the fine-tuning proxy, on each variant of its train set.
  proxies = {variant: {} for variant in PROXY_VARIANTS}
  if 'proxy' in args.rows:
    pre_root = export_folder(
        args.source_dir, args.data_dir,
        f'fmnist32_c0-4_train{sizes["pretrain_per_class"]}pc_test'
        f'{sizes["pretrain_test_per_class"]}pc', range(5),
        sizes['pretrain_per_class'], sizes['pretrain_test_per_class'])
    print(f'Row 2: pretrain on classes 0-4 ({sizes["pretrain_per_class"]}'
          f'/class, {sizes["pretrain_epochs"]} epochs, batch {batch}), '
          'fine-tune on classes 5-9 (train images per class: '
          + ', '.join(f'{variant} {train_counts[variant]}'
                      for variant in proxy_variants) + ', '
          f'{sizes["finetune_epochs"]} epochs, batch '
          f'{sizes["finetune_batch_size"]})', flush=True)
    pre_dir = os.path.join(work_dir, 'pretrain_c0-4')
    pretrain = _attempt('pretrain', run_keras_sft, pre_root, pre_dir,
                        sizes['pretrain_epochs'], batch, seed, keep=True)
    weights_file = os.path.join(work_dir, 'backbone_c0-4.weights.h5')
    if _ok(pretrain):
      print(f'  pretrain: top-1 {pretrain["top1"]:.4f} (classes 0-4) in '
            f'{pretrain["wall_seconds"]:.0f} s', flush=True)
      pretrain['backbone'] = _attempt('backbone', _extract, pre_dir,
                                      weights_file, work_dir)
      if not args.keep_checkpoints:
        shutil.rmtree(os.path.join(pre_dir, 'checkpoints'),
                      ignore_errors=True)
    have_backbone = _ok(pretrain) and _ok(pretrain['backbone'])
    if have_backbone:
      print(f'  backbone saved to {weights_file} '
            f'({pretrain["backbone"]["wall_seconds"]:.0f} s)', flush=True)
    results['pretrain'] = pretrain
    test_pc = sizes['finetune_test_per_class']
    val_pc = sizes['finetune_val_per_class']
    for variant in proxy_variants:
      counts = train_counts[variant]
      balanced = variant == 'balanced'
      ft_root = export_folder(
          args.source_dir, args.data_dir,
          f'fmnist32_c5-9_train'
          f'{f"{counts[0]}pc" if balanced else "-".join(map(str, counts))}'
          f'_test{test_pc or "all"}_val{val_pc}pc', range(5, 10),
          counts[0] if balanced else counts, test_pc, val_per_class=val_pc)
      print(f'  {variant}: train images per class {counts}', flush=True)
      proxy = proxies[variant]
      for name in proxy_rows:
        slug, pretrained, extra = PROXY_ROWS[name]
        if variant != 'imbalanced' and name in IMBALANCED_ONLY_PROXY_ROWS:
          print(f'  {name}: not run on {variant} data (the imbalanced '
                'variant only; see IMBALANCED_ONLY_PROXY_ROWS)', flush=True)
          continue
        if pretrained and not have_backbone:
          proxy[name] = dict(error='no pretrained backbone (see pretrain)')
          continue
        run_dir = os.path.join(work_dir, PROXY_SUBDIRECTORIES[variant], slug)
        os.makedirs(os.path.dirname(run_dir), exist_ok=True)
        proxy[name] = _attempt(
            name, run_keras_sft, ft_root, run_dir,
            sizes['finetune_epochs'], sizes['finetune_batch_size'], seed,
            weights=weights_file if pretrained else None, extra=extra,
            keep=args.keep_checkpoints)
        if _ok(proxy[name]):
          print(f'  {name}: top-1 {proxy[name]["top1"]:.4f}, macro-F1 '
                f'{proxy[name]["macro_f1"]:.4f}, ECE '
                f'{proxy[name]["ece"]:.4f} in '
                f'{proxy[name]["wall_seconds"]:.0f} s', flush=True)
  for variant, key in PROXY_RESULTS_KEYS.items():
    results[key] = proxies[variant]
  results['finetune_train_per_class'] = {
      variant: train_counts[variant] for variant in proxy_variants}
  results['total_wall_seconds'] = time.perf_counter() - total_start

  # Tables and targets.
  tables, targets = [], {}
  if row1:
    seed_row = row1.get('seed PyTorch loop')
    tables.append(_table(
        f'From scratch: {sizes["train_images"]} train / '
        f'{sizes["test_images"]} test images, {sizes["epochs"]} epochs, batch '
        f'{batch}, seed {seed}', [(k, v) for k, v in row1.items() if v],
        seed_row, 'seed loop'))
    for name, ours in row1.items():
      if name == 'seed PyTorch loop' or not (_ok(seed_row) and _ok(ours)):
        continue
      error_ratio = _ratio(1 - ours['top1'], 1 - seed_row['top1'])
      wall_ratio = _ratio(ours['wall_seconds'], seed_row['wall_seconds'])
      targets[f'error_ratio: {name}'] = dict(
          value=error_ratio, target=TARGET_ERROR_RATIO,
          met=error_ratio <= TARGET_ERROR_RATIO)
      targets[f'wall_ratio: {name}'] = dict(
          value=wall_ratio, target=TARGET_WALL_RATIO,
          met=wall_ratio <= TARGET_WALL_RATIO)
  for variant, proxy in proxies.items():
    if not proxy:
      continue
    scratch = proxy.get('from scratch')
    pretrain = results['pretrain']
    counts = train_counts[variant]
    described = (f'{counts[0]} train images/class' if variant == 'balanced'
                 else f'train images per class {counts}')
    tables.append(_table(
        f'Fine-tuning proxy ({variant}): classes 5-9, {described}, '
        f'{sizes["finetune_test_per_class"] or "all"} test images/class, '
        f'{sizes["finetune_epochs"]} epochs, batch '
        f'{sizes["finetune_batch_size"]}; backbone pretrained on classes 0-4 '
        f'(top-1 {pretrain["top1"]:.4f} there)' if _ok(pretrain) else
        f'Fine-tuning proxy ({variant}): pretraining FAILED',
        list(proxy.items()), scratch, 'from scratch'))
    if (variant == 'balanced' and _ok(scratch)
        and _ok(proxy.get('fine-tuned'))):
      gain = proxy['fine-tuned']['top1'] - scratch['top1']
      targets['finetune_gain'] = dict(value=gain, target=args.clear_margin,
                                      met=gain >= args.clear_margin)
  results['targets'] = targets
  print()
  if args.quick:
    print('QUICK MODE: plumbing check only, the numbers below mean nothing.')
  print(f'{results["machine"]["cpu"]}, {results["machine"]["cpus"]} CPUs; '
        + ', '.join(f'{k} {v}' for k, v in
                    results['machine']['versions'].items() if v)
        + f'; {results["date"]}')
  for table in tables:
    print()
    print(table)
  print()
  for name, target in targets.items():
    if args.quick:
      print('targets: not judged in quick mode')
      break
    print(f'target {name}: {target["value"]:.3f} (target '
          f'{"<=" if name != "finetune_gain" else ">="} {target["target"]}): '
          f'{"met" if target["met"] else "NOT met"}')
  print(f'total wall time {results["total_wall_seconds"]:.0f} s')
  results['tables'] = tables
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as file:
      json.dump(results, file, indent=1, default=str)
    print(f'Wrote {args.out}')
  failed = [name for name, row in [
      *row1.items(), ('pretrain', results.get('pretrain')),
      *[(f'{name} ({variant})', row)
        for variant, proxy in proxies.items() for name, row in proxy.items()]]
            if row is not None and 'error' in row]
  if failed:
    sys.exit(f'FAILED: {", ".join(failed)} (see the log files in {work_dir})')
  return results


def parse_args(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--setup', action='store_true',
                      help='install the data (apt) and torch (pip), then exit')
  parser.add_argument('--quick', action='store_true',
                      help='a few hundred images, 1 epoch: plumbing only (CI)')
  parser.add_argument('--out', help='write the results as JSON here')
  parser.add_argument('--data_dir', default=os.path.expanduser(
      '~/.cache/keras_sft_accuracy'), help='PNG exports and runs go here')
  parser.add_argument('--work_dir', help='run directories (default: '
                      '<data_dir>/runs/<date-time>); must be new')
  parser.add_argument('--source_dir', default=FASHION_MNIST_DIR,
                      help='the Fashion-MNIST idx .gz files')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--rows', default='scratch,proxy',
                      help='comma list of scratch, proxy')
  parser.add_argument('--scratch_rows', default=None,
                      help='comma list of rows (work directories or '
                      'names): ' + ', '.join(
                          entry[0] for entry in SCRATCH_ROWS.values())
                      + ' (default: all; --quick: the defaults only)')
  parser.add_argument('--proxy_rows', default=None,
                      help='comma list of rows (work directories or names): '
                      + ', '.join(entry[0] for entry in PROXY_ROWS.values())
                      + ' (default: all; --quick: '
                      + ', '.join(QUICK_PROXY_ROWS) + ')')
  parser.add_argument('--proxy_variants', default=None,
                      help='comma list of ' + ', '.join(PROXY_VARIANTS)
                      + ': the fine-tuning train sets (default: both; '
                      '--quick: ' + ', '.join(QUICK_PROXY_VARIANTS) + ')')
  parser.add_argument('--imbalance_ratio', type=float, default=10.0,
                      help='imbalanced variant: most / least frequent '
                      'class (counts fall geometrically over classes 5-9)')
  parser.add_argument('--skip_seed_loop', action='store_true')
  parser.add_argument('--torch_python', default=sys.executable,
                      help='Python with torch + torchvision that runs the '
                      'seed loop (default: this one)')
  parser.add_argument('--keep_checkpoints', action='store_true',
                      help='keep the runs\' checkpoints (~0.6 GB each)')
  parser.add_argument('--wait_idle_seconds', type=float, default=0,
                      help='before each timed process, wait up to this long '
                      'for other processes to leave the CPUs idle (shared '
                      'machines)')
  parser.add_argument('--clear_margin', type=float, default=0.05,
                      help='top-1 gain of fine-tuned over from scratch that '
                      'counts as clear')
  for key, value in FULL.items():
    parser.add_argument(f'--{key}', type=int, default=None,
                        help=f'default {value} (quick: {QUICK[key]})')
  parser.add_argument('--_seed_loop', help=argparse.SUPPRESS)
  parser.add_argument('--_extract_backbone', help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args._seed_loop:  # pylint: disable=protected-access
    print(json.dumps(seed_loop(**json.loads(args._seed_loop))))  # pylint: disable=protected-access
    return
  if args._extract_backbone:  # pylint: disable=protected-access
    print(json.dumps(extract_backbone(*json.loads(args._extract_backbone))))  # pylint: disable=protected-access
    return
  if args.setup:
    subprocess.run(['bash', os.path.join(REPO_ROOT, 'benchmarks',
                                         'setup_accuracy.sh'), sys.executable],
                   check=True)
    return
  args.rows = tuple(args.rows.split(','))
  global WAIT_IDLE_SECONDS, TORCH_PYTHON
  WAIT_IDLE_SECONDS = args.wait_idle_seconds
  TORCH_PYTHON = args.torch_python
  benchmark(args)


if __name__ == '__main__':
  main()
