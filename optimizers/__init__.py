"""Client (tf.keras) and server (tff.learning) optimizers for prompt tuning."""

from optimizers.client_optimizers import ClientOptimizer, build_client_optimizer
from optimizers.server_optimizers import ServerOptimizer, build_server_optimizer

__all__ = [
    "ClientOptimizer",
    "ServerOptimizer",
    "build_client_optimizer",
    "build_server_optimizer",
]
