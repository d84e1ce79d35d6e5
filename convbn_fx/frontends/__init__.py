"""Layer 6, frontends: the ways in. `tune_mode`/`describe` (tune.py), `deploy_mode`
(deploy_mode.py), the torch.compile backend and inductor pre-grad pass (compile.py, which
imports inductor and is loaded only when asked for) and `tune_exported` (export.py).
Imports the model layer and below.
"""
