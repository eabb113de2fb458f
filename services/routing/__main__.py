"""Run the routing service: ``python -m services.routing``."""

from omnistock.service import run_forever
from services.routing.app import SPEC

if __name__ == "__main__":
    run_forever(SPEC)
