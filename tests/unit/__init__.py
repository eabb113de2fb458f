"""Unit tests: pure rules, no I/O."""
