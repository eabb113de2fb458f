"""The embedded development stack: PostgreSQL and nats-server run from wheels.

Used by ``omni dev run`` (data under the git-ignored state folder, fixed ports)
and by the test harness (a temporary folder, free ports).
"""
