"""Pure numpy optimizers, schedules, clipping and state records. No HTTP, no I/O."""
