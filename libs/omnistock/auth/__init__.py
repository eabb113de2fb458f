"""Authentication and authorisation: signed tokens, roles, the per-RPC policy.

``tokens`` verifies ES256 JWTs against a JWKS (several keys at once, so keys
rotate) and mints them from a development key; ``policy`` says which role may
call which RPC and whether the call is limited to the caller's own channels or
locations; the servicers check that scope with :func:`policy.authorize`.
"""
