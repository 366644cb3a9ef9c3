"""Deprecated: `python -m keras_sft.export` is the export command.

Kept for one release; it prints a notice and runs `keras_sft.export`.
"""

import sys

from keras_sft import export


def run():
  print('keras_sft.export_main is deprecated and goes in the next release: '
        'use python -m keras_sft.export (same flags).', file=sys.stderr)
  export.run()


if __name__ == '__main__':
  run()
