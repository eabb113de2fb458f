"""The reservation service: holds that never oversell, and available-to-promise."""
