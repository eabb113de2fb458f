"""Run the fulfilment service: ``python -m services.fulfilment``."""

from omnistock.service import run_forever
from services.fulfilment.app import SPEC

if __name__ == "__main__":
    run_forever(SPEC)
