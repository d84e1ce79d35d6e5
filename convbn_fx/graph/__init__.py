"""Layer 4, graph: the rewrite as a pass over one torch.fx graph, with no nn.Module state.

normalize.py reads conv/linear/BN calls in every spelling, ends.py turns a call into one end
of a block, guards.py is the one chain of skip reasons, find.py finds the blocks, choose.py
picks each block's lowering, lower.py applies them, and tune_graph.py is the pass that does
all of it. Imports the vocabulary, kernels and passes; never the tracer or a model.
"""
