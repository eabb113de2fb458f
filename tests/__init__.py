"""Omnistock test suite."""
