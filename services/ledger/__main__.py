"""Run the stock ledger service: ``python -m services.ledger``."""

from omnistock.service import run_forever
from services.ledger.app import SPEC

if __name__ == "__main__":
    run_forever(SPEC)
