"""Layer 5, model: models and their state, around the graph pass.

tracer.py traces with block modules kept as calls, tree.py answers questions about a module
tree, watch.py reads the state a lowering depends on, tuned.py is the TunedGraphModule that
follows it, parts.py keeps rewritten submodules in their own class, pickling.py is what a
whole-model pickle of either holds, and walk.py rewrites a model whole or in parts. Imports
the graph layer and below.
"""
