"""The flexmoe lab: the demo pipeline, its corpus sets, its settings (as data), the lever and
recipe studies and the report's prose, on top of the flexmoe library.

The library never imports this package (tests/test_lab_boundary.py); its command is
``flexmoe-lab`` (``demo``, ``corpora``, ``report``), and ``lab/experiments/`` scripts use it.
"""
