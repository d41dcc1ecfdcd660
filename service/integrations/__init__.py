"""What observes jobs from outside: webhook delivery (with its checked name lookups) and
Prometheus metrics."""
