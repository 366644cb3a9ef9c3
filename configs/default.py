"""The default config: `keras_sft/default_config.py`, every key with a comment.

It lives in the package so that experiment configs load from any directory
(`from keras_sft import default_config`); this file keeps
`--config=configs/default.py` and `from configs import default` working.
"""

from keras_sft.default_config import get_config  # pylint: disable=unused-import
