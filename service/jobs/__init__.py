"""Durable jobs, with no HTTP in them: admission, the job manager, its SQLite database, the image
store, archives, idempotency, re-rolls and the webhook outbox written with each job's state."""
