"""swarm-aggregator: one action per environment step from a swarm of RL policies.

The `processor` package holds the core (config, message decoding, windows, aggregation,
the contribution ledger, metrics and the worker loop), which imports no transport: the
worker is handed one. Beside it are the commands built on the core, which do use
transports: `cli` picks one by config, `demo` and `loadgen` speak ZeroMQ.
"""

__version__ = "0.1.0"
