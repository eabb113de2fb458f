"""Authentication, roles and TLS through real gRPC."""
