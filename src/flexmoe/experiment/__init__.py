"""The demo experiment on top of the library: corpus sets, settings (as data) and the pipeline.

Nothing in the library imports this package; the CLI does (``flexmoe demo``, ``flexmoe data
demo``), and so do ``experiments/`` scripts.
"""
