"""Test harness: quiet TF, a TFF execution context, sni-mini discovery, cleanup.

pytest never runs a `__main__`, so the TFF context that a driver would set up
is installed here, once per session, and torn down (with every `worker_binary`
child it started) at the end (DESIGN.md section 5, trap 1).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pathlib  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
from absl import flags  # noqa: E402

warnings.filterwarnings("ignore")

import tensorflow as tf  # noqa: E402,F401

from fedprompt import execution  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SNI_MINI_DIR = pathlib.Path(
    os.environ.get("FEDPROMPT_SNI_MINI", REPO_ROOT.parent / "shared" / "data" / "sni-mini")
)


def pytest_configure(config):
    del config
    tf.get_logger().setLevel("ERROR")
    # absl's test helpers (create_tempdir, flagsaver) read flags; pytest never
    # parses them, so use their defaults.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session", autouse=True)
def tff_execution_context():
    """One local C++ TFF context for the whole session, always cleaned up."""
    with execution.local_context():
        yield


@pytest.fixture(scope="session")
def sni_mini_dir():
    if not SNI_MINI_DIR.is_dir():
        pytest.skip(
            f"sni-mini not found at {SNI_MINI_DIR}; these tests need the shared SNI subset "
            "beside the repository (../shared/data/sni-mini) or FEDPROMPT_SNI_MINI=/path."
        )
    return SNI_MINI_DIR


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A per-session fedprompt cache, unless the user points at a warm one."""
    path = os.environ.get("FEDPROMPT_TEST_CACHE")
    if path:
        return pathlib.Path(path)
    return tmp_path_factory.mktemp("fedprompt-cache")


def pytest_collection_modifyitems(config, items):
    del config
    if SNI_MINI_DIR.is_dir():
        return
    skip = pytest.mark.skip(reason=f"needs sni-mini at {SNI_MINI_DIR} (absent)")
    for item in items:
        if "sni_mini" in item.keywords:
            item.add_marker(skip)
