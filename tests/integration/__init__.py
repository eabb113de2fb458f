"""Integration tests against real PostgreSQL, nats-server and gRPC servers."""
