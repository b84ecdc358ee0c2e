"""The training wing: ``train(TrainConfig(...))`` runs one strategy and writes the run directory.

config (TrainConfig and the names it accepts), loaders (in-memory batches), loop (fit, evaluate,
EMA, optimizers and schedules), rundir (state, RNG, history, curves), strategy (what a strategy
gets and returns), scratch and transfer (the strategies), run (one run, end to end).
"""
from .config import TrainConfig
from .run import RunResult, train

__all__ = ["RunResult", "TrainConfig", "train"]
