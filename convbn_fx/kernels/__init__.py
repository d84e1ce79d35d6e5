"""Layer 2, kernels: what a rewritten graph calls at run time.

The fold arithmetic (fold.py), the folded conv and linear that recompute `W·s` in backward
(conv.py, linear.py, each with its custom op for torch.compile), Deploy's cached fold
(frozen.py), the input checks that survive the rewrite (checks.py) and the per-call choice
between Tune and Eval (choice.py). Imports only the vocabulary.
"""
