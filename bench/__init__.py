"""The benchmark suite of swarm-aggregator: `python -m bench` (or `make bench`).

Every figure is measured on loopback against real processes (the worker as
`python -m processor run`, the swergio 0.0.2 server, reference peers), next to a
baseline measured in the same run, so that a ratio survives a noisy machine better than
the absolute numbers do. See `bench/__main__.py` for the sections and the options.

This package must stay light to import: the peer processes (`bench.peers`) load it.
"""
