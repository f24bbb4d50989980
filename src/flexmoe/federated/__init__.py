"""Federated rounds: the owners improve the merged model on their own text, and only updates
leave their machines (Flower).

:mod:`.owner` is an owner's work at home, :mod:`.rounds` the coordinator's state and versions,
:mod:`.flower` the Flower apps and the simulation, :mod:`.deploy` the same apps on Flower's
deployment runtime (``fed serve`` / ``fed join``), :mod:`.privacy` the update-level differential
privacy, :mod:`.run` the checks and the one call that the command line makes.
"""
