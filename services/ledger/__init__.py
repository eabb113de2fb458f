"""The stock ledger: append-only movements and the on-hand that follows from them."""
