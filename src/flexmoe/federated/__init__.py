"""Federated rounds: the owners improve the merged model on their own text, and only updates
leave their machines (Flower).

:mod:`.owner` is an owner's work at home, :mod:`.rounds` the coordinator's state and versions,
:mod:`.flower` the Flower apps and the simulation, :mod:`.run` the checks and the one call that
the command line makes.
"""
