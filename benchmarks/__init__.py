"""Benchmarks, runnable with make bench."""
