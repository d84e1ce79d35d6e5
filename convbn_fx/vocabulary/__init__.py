"""Layer 1, vocabulary: the words every other layer uses, and nothing that computes.

Errors (errors.py), the four modes (modes.py), the block record that matching fills and the
lowerings read (blocks.py), and which modules and functions are what, with the user's
declarations (kinds.py). Imports nothing from convbn_fx.
"""
