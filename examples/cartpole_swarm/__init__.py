"""A real swarm: Stable-Baselines3 policies on Gymnasium's CartPole-v1, through the worker.

    python -m examples.cartpole_swarm [--transport zmq|nats|swergio] [--models 6]
                                      [--steps 3000] [--envs B] [--train-every 5]

Processes (all on 127.0.0.1): the transport's own (ZeroMQ's proxy, nats-server, or the
swergio server), the worker (`swarm-aggregator run`), M model processes (`model.py`: an SB3
A2C or PPO policy each, trained every 5 steps on the transitions of the swarm's actions),
and this one, the launcher, which also runs the environment (`environment.py`) and the
evolution loop (`evolution.py`). Every peer is a `processor.client` swarm built from the
worker's own config file. Topics and messages: `common.py`.
"""
