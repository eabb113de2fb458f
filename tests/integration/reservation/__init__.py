"""Integration tests of the reservation service."""
