"""Few labels, many images: supervised-only vs FixMatch and self-training.

Real images: Fashion-MNIST from Debian (see benchmarks/accuracy.py, whose
data writer, run helper and fine-tuning proxy this reuses). The proxy: a
ResNet50 is pretrained by keras-sft on classes 0-4 (labels known), its
backbone saved as a no-top weights file; then classes 5-9 are learned from
`--labeled_per_class` labelled images each, plus `--unlabeled_per_class`
further train images of each of those classes whose labels are hidden (a
flat folder of PNGs, `--config.unlabeled=folder:...`; none of them is a
labelled or test image). Test: `--test_per_class` test images of each class.
With `--from_scratch` the rows start from random weights instead (no
pretraining).

Rows, same epochs over the labelled images, same batch, same seed, each its
own `python -m keras_sft.main` process (wall time is the whole process):
  supervised: the defaults on the labelled images only;
  fixmatch:   the same plus --config.semi_supervised=fixmatch (defaults:
              μ=7, τ=0.95, λ_u=1) on the unlabelled folder;
  self_training: the same plus --config.semi_supervised=self_training
              (defaults): its teacher is the supervised row's run again,
              then the student; wall time is the whole (teacher, labelling,
              student);
  self_training_fresh: the same with each student started from
              --config.weights, not from its teacher's network
              (--config.self_training_student_init=pretrained);
  oracle:     the ceiling of any method: the labelled and the unlabelled
              images all with their true labels, supervised, for
              --oracle_epochs over them (not the same epochs: a ceiling
              is trained to its end). Its error ratio is the least a
              semi-supervised row could reach.
The fraction of unlabelled images above τ per epoch comes from the run's
history.csv (`unlabeled_mask_rate`); the accuracy of self-training's
pseudo-labels from its pseudo_labels_1.json (file names are train indices:
the true labels are known here, never read by keras-sft).

The machine this was written on is shared: wall times are only comparable
within one run of this script (the ratio is reported).

Usage:
  PYTHONPATH=. python benchmarks/semi_supervised.py [--out=FILE.json]
"""

import argparse
import csv
import datetime
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import accuracy  # pylint: disable=g-import-not-at-top,wrong-import-position


def export_unlabeled(source_dir, data_dir, classes, skip_per_class,
                     per_class):
  """Writes (once) train images `skip_per_class ..` of each class, labels
  dropped, as <data_dir>/<name>/<idx index>.png; returns the folder."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  name = (f'fmnist32_c{classes[0]}-{classes[-1]}_unlabeled_after'
          f'{skip_per_class}_{per_class}pc')
  root = os.path.join(data_dir, name)
  marker = os.path.join(root, '.complete')
  if os.path.exists(marker):
    return root
  os.makedirs(root, exist_ok=True)
  images, labels = accuracy.load_split(source_dir, 'train')
  for label in classes:
    where = np.flatnonzero(labels == label)
    for index in where[skip_per_class:skip_per_class + per_class]:
      Image.fromarray(accuracy.to_rgb32(images[index])).save(
          os.path.join(root, f'{index:05d}.png'))
  with open(marker, 'w') as file:
    file.write('done\n')
  return root


def _mask_rates(workdir):
  with open(os.path.join(workdir, 'history.csv')) as file:
    return [round(float(row['unlabeled_mask_rate']), 4)
            for row in csv.DictReader(file)]


def _pseudo_label_quality(workdir, source_dir):
  """Accuracy of round 1's pseudo-labels against the hidden labels, and the
  teacher's top-1 (from the student's metrics.json)."""
  with open(os.path.join(workdir, 'self_training',
                         'pseudo_labels_1.json')) as file:
    record = json.load(file)
  with open(os.path.join(workdir, 'metrics.json')) as file:
    teacher = json.load(file)['self_training']['teacher']
  _, labels = accuracy.load_split(source_dir, 'train')
  # Class folders are named '<label>_<name>'; files '<train index>.png'.
  names = sorted(record['predicted_per_class'])
  true = [int(labels[int(os.path.basename(path).split('.')[0])])
          for path in record['files']]
  predicted = [int(names[label].split('_')[0]) for label in record['labels']]
  return dict(
      teacher_top1=teacher['top1'],
      num_pseudo_labeled=record['num_pseudo_labeled'],
      num_unlabeled=record['num_unlabeled'],
      pseudo_label_accuracy=float(np.mean(np.equal(true, predicted)))
      if true else None,
      pseudo_labeled_per_class=record['pseudo_labeled_per_class'])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--source_dir', default=accuracy.FASHION_MNIST_DIR)
  parser.add_argument('--data_dir', default=os.path.expanduser(
      '~/.cache/keras_sft_semi_supervised'))
  parser.add_argument('--work_dir', default=None)
  parser.add_argument('--pretrain_per_class', type=int, default=600)
  parser.add_argument('--pretrain_epochs', type=int, default=4)
  parser.add_argument('--pretrain_batch_size', type=int, default=64)
  parser.add_argument('--labeled_per_class', type=int, default=10)
  parser.add_argument('--unlabeled_per_class', type=int, default=600)
  parser.add_argument('--test_per_class', type=int, default=200)
  parser.add_argument('--epochs', type=int, default=30)
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--oracle_epochs', type=int, default=3,
                      help='epochs of the oracle row over labelled + '
                      'unlabelled images (3: 3x the steps of the supervised '
                      'row at 10 labels per class)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--fixmatch_flags', default='',
                      help='extra flags of the fixmatch row, space-separated')
  parser.add_argument('--self_training_flags', default='',
                      help='extra flags of the self_training row')
  parser.add_argument('--rows', default='supervised,fixmatch,self_training',
                      help='rows to run, comma-separated (supervised is the '
                      'baseline and always runs)')
  parser.add_argument('--backbone', default=None,
                      help='a backbone file of an earlier run of this '
                      'script (same --pretrain_* flags): skips pretraining')
  parser.add_argument('--from_scratch', action='store_true',
                      help='rows start from random weights (weights=None); '
                      'no pretraining')
  parser.add_argument('--out', default=None)
  args = parser.parse_args()

  started = datetime.datetime.now().astimezone()
  work_dir = args.work_dir or os.path.join(
      args.data_dir, 'runs', started.strftime('%Y%m%d-%H%M%S'))
  os.makedirs(work_dir, exist_ok=True)
  results = dict(date=started.isoformat(timespec='seconds'),
                 machine=accuracy.machine(), flags=vars(args),
                 work_dir=work_dir)
  pre_root = accuracy.export_folder(
      args.source_dir, args.data_dir,
      f'fmnist32_c0-4_train{args.pretrain_per_class}pc_test100pc', range(5),
      args.pretrain_per_class, 100)
  labeled_root = accuracy.export_folder(
      args.source_dir, args.data_dir,
      f'fmnist32_c5-9_train{args.labeled_per_class}pc_test'
      f'{args.test_per_class}pc', range(5, 10), args.labeled_per_class,
      args.test_per_class)
  unlabeled_root = export_unlabeled(args.source_dir, args.data_dir,
                                    list(range(5, 10)),
                                    args.labeled_per_class,
                                    args.unlabeled_per_class)

  pre_dir = os.path.join(work_dir, 'pretrain_c0-4')
  weights_file = os.path.join(work_dir, 'backbone_c0-4.weights.h5')
  if args.from_scratch:
    weights_file = results['backbone'] = None
  elif args.backbone:
    weights_file = results['backbone'] = args.backbone
  else:
    print(f'Pretraining on classes 0-4 ({args.pretrain_per_class}/class, '
          f'{args.pretrain_epochs} epochs)', flush=True)
    results['pretrain'] = accuracy.run_keras_sft(
        pre_root, pre_dir, args.pretrain_epochs, args.pretrain_batch_size,
        args.seed, keep=True)
    results['backbone'] = accuracy._extract(pre_dir, weights_file, work_dir)  # pylint: disable=protected-access
    print(f'  pretrain top-1 {results["pretrain"]["top1"]:.4f} in '
          f'{results["pretrain"]["wall_seconds"]:.0f} s', flush=True)

  rows = {
      'supervised': [],
      'fixmatch': [f'--config.unlabeled=folder:{unlabeled_root}',
                   '--config.semi_supervised=fixmatch',
                   *args.fixmatch_flags.split()],
      'self_training': [f'--config.unlabeled=folder:{unlabeled_root}',
                        '--config.semi_supervised=self_training',
                        *args.self_training_flags.split()],
      # The same with fresh students (from --config.weights).
      'self_training_fresh': [
          f'--config.unlabeled=folder:{unlabeled_root}',
          '--config.semi_supervised=self_training',
          '--config.self_training_student_init=pretrained',
          *args.self_training_flags.split()],
      'oracle': [],
  }
  chosen = {'supervised', *args.rows.split(',')}
  unknown = chosen - set(rows)
  if unknown:
    parser.error(f'unknown --rows {sorted(unknown)}; choose from {list(rows)}')
  results['rows'] = {}
  for name, extra in rows.items():
    if name not in chosen:
      continue
    workdir = os.path.join(work_dir, name)
    root, epochs = labeled_root, args.epochs
    if name == 'oracle':
      # The first labeled + unlabeled train images of each class: the
      # labelled images and the unlabelled folder's (export_unlabeled), with
      # their labels.
      every = args.labeled_per_class + args.unlabeled_per_class
      root = accuracy.export_folder(
          args.source_dir, args.data_dir,
          f'fmnist32_c5-9_train{every}pc_test{args.test_per_class}pc',
          range(5, 10), every, args.test_per_class)
      epochs = args.oracle_epochs
    row = accuracy.run_keras_sft(root, workdir, epochs, args.batch_size,
                                 args.seed, weights=weights_file, extra=extra)
    if name == 'fixmatch':
      row['unlabeled_mask_rate_per_epoch'] = _mask_rates(workdir)
    if name.startswith('self_training'):
      row.update(_pseudo_label_quality(workdir, args.source_dir))
    results['rows'][name] = row
    print(f'  {name}: top-1 {row["top1"]:.4f} in {row["wall_seconds"]:.0f} s '
          f'(other processes took {row["other_cpu_fraction"]:.0%} of the '
          'CPU)', flush=True)
  supervised = results['rows']['supervised']
  for name, row in results['rows'].items():
    if name == 'supervised':
      continue
    row['error_ratio'] = (1 - row['top1']) / max(1 - supervised['top1'], 1e-9)
    row['wall_ratio'] = row['wall_seconds'] / supervised['wall_seconds']
    print(f'{name} / supervised: error ratio {row["error_ratio"]:.3f}, '
          f'wall-time ratio {row["wall_ratio"]:.2f}', flush=True)
  if args.out:
    with open(args.out, 'w') as file:
      json.dump(results, file, indent=1)


if __name__ == '__main__':
  main()
