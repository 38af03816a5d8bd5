"""slim_rl: a thin SLIM-RL trainer for block-diffusion LMs built on slim_ops."""

__version__ = "0.1.0"
