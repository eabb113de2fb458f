"""Fulfilment: the work each location does for routed orders."""
