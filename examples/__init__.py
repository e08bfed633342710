"""Examples built on swarm-aggregator and its client library (`processor.client`).

They run from a clone (`python -m examples.NAME`) and are not part of the installed
package. `cartpole_swarm`: a swarm of Stable-Baselines3 policies on Gymnasium's CartPole.
"""
