"""Events over NATS JetStream: envelope, transactional outbox, idempotent consumer."""
