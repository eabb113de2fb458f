"""Run the reservation service: ``python -m services.reservation``."""

from omnistock.service import run_forever
from services.reservation.app import SPEC

if __name__ == "__main__":
    run_forever(SPEC)
