"""Sessions: lifecycle, step semantics, idempotency and durable storage (no HTTP here)."""
