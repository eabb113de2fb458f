"""The order routing service: where each order is fulfilled from, and why."""
