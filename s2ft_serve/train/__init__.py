"""The S²FT trainer: `train(TrainConfig)` (trainer.py) and the `s2ft-train` command (cli.py).

data.py reads JSONL into masked examples, selection.py chooses heads and channels per layer,
sparse_linear.py trains column deltas with partial back-propagation, loop.py optimizes them,
checkpoint.py saves and resumes without pickle.
"""
