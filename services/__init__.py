"""The Omnistock services, one package per bounded context."""
