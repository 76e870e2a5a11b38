"""Layer 2 of 3: the work protoaudit does, as library functions.

Recipes (the only validator), datasets, training stages, push, the patch index, checkpoints, the run directory and
its single writer, and the verbs (train-ensemble, import, prune, audit, explain, global analysis). It builds on
``protoaudit.core``; ``protoaudit.report`` and ``protoaudit.cli`` build on it.
"""
