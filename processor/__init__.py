"""swarm-aggregator: one action per environment step from a swarm of RL policies.

The `processor` package holds the core (config, message decoding, windows, aggregation,
the contribution ledger, metrics and the worker loop), which imports no transport and no
application: the worker is handed a transport. The applications built on the core live in
`processor/apps/` (the command line, demo, load generator, top, study) and do use
transports: `cli` picks one by config, `demo` and `loadgen` speak ZeroMQ.
"""

__version__ = "0.1.0"
