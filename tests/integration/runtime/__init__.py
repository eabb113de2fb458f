"""Integration tests of the shared runtime (outbox, consumer, NATS, gRPC bootstrap)."""
