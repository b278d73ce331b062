"""Federated sessions: client updates aggregated into optimizer steps, durably.

- :mod:`.errors`: what a client can get wrong about rounds and versions;
- :mod:`.models`: an update request and its acknowledgement;
- :mod:`.state`: the aggregation state at creation and in checkpoints;
- :mod:`.session`: the synchronous logic on one session (check, apply, replay, documents);
- :mod:`.coordinator`: the asynchronous side (locking, logging, round timers, long polls).
"""
