"""How one party trains and is evaluated: the loop, losses, objectives, evaluation, baselines."""
