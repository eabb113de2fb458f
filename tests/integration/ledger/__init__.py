"""Integration tests of the stock ledger service."""
