"""Inference: which experts are active, generation, and attribution of every answer."""
