"""The demo: the network ``omni dev run`` loads, and the omnichannel journey played on it."""
