"""Training: the loop (loop.py), its optimiser and EMA (optim.py), self-describing checkpoints and
model files (checkpoint.py), and data-parallel launch over processes and machines (distributed.py).
"""
