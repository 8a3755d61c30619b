"""fedprompt: federated soft-prompt tuning and its personalization/robustness trade-off.

The TFF builders other research code imports:

    from fedprompt import build_fed_avg, build_fed_sgd, build_personalization_evaluation

`fedprompt.program.run_experiment` is the whole benchmark behind `run_experiment.py`.
"""

import os

# Quiet TF's C++ logging unless the user chose a level (DESIGN.md trap 5); this must
# happen before TensorFlow is first imported, which the imports below do.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# oneDNN CPU kernels. TF 2.14 turns them on by default only on CPUs with
# AVX-512-class features; elsewhere (e.g. AVX2 x86 like this project's 2-core AMD
# EPYC) it runs Eigen kernels, which made a SmolLM2 prompt-tuning step 1.6x slower
# and greedy decoding 1.3x slower (docs/PERFORMANCE.md). TF reads the switch at its
# first op, not at import, and TFF's worker_binary inherits it from this process.
# A value the user set (TF_ENABLE_ONEDNN_OPTS=0 for Eigen) wins. Results differ
# from Eigen's in float32 summation order only.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from fedprompt import execution  # noqa: F401 (registers the TFF clean-up at exit)
from fedprompt.fed_avg import ClientWeighting, build_fed_avg, build_fed_avg_components
from fedprompt.fed_sgd import build_fed_sgd, build_fed_sgd_components
from fedprompt.personalization import (
    PersonalizationGrid,
    build_personalization_evaluation,
    run_personalization,
)
from fedprompt.prompt_model import PromptInit, PromptTunedLM, create_initial_prompt
from fedprompt.server_update import ServerState

__all__ = [
    "ClientWeighting",
    "PersonalizationGrid",
    "PromptInit",
    "PromptTunedLM",
    "ServerState",
    "build_fed_avg",
    "build_fed_avg_components",
    "build_fed_sgd",
    "build_fed_sgd_components",
    "build_personalization_evaluation",
    "create_initial_prompt",
    "run_personalization",
]
