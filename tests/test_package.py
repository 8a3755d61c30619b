"""Tests of what importing fedprompt sets up: the CPU kernels TF runs."""

import os
import subprocess
import sys

import tensorflow as tf

_PROBE = """
import tensorflow as tf
import fedprompt
from tensorflow.python.util import _pywrap_util_port
tf.matmul(tf.ones([2, 2]), tf.ones([2, 2]))
print("onednn", _pywrap_util_port.IsMklEnabled())
"""


def _onednn_in_subprocess(**env):
    environment = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    environment.update(env)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, env=environment, check=True
    ).stdout
    return [line for line in out.splitlines() if line.startswith("onednn")][-1]


class CpuKernelsTest(tf.test.TestCase):
    def test_onednn_on_by_default_even_when_tensorflow_was_imported_first(self):
        self.assertEqual(_onednn_in_subprocess(), "onednn True")

    def test_the_users_choice_wins(self):
        self.assertEqual(_onednn_in_subprocess(TF_ENABLE_ONEDNN_OPTS="0"), "onednn False")
