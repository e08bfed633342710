"""swarm-aggregator: one action per environment step from a swarm of RL policies.

The `processor` package is the transport-free core: config, message decoding, windows,
aggregation, the contribution ledger, metrics and the worker loop.
"""

__version__ = "0.1.0"
