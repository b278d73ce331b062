"""Federated aggregation in pure numpy: client updates in, one pseudo-gradient per round out.

- :mod:`.spec`: the session option ``aggregation`` ("rounds" or "async"), validated;
- :mod:`.staleness`: FedAsync's staleness weights (constant, polynomial);
- :mod:`.rounds`: the open round (a running weighted sum of client deltas), its
  pseudo-gradient, the per-round history, and their flat form for checkpoints.

The server-side optimizers that consume the pseudo-gradient, including Flower's presets
(FedAvg, FedAvgM, FedAdagrad, FedAdam, FedYogi), are ordinary optimizers in
:mod:`service.core.optimizers`.
"""
