"""Shared runtime of the Omnistock services: settings, database, messaging, gRPC, metrics."""
