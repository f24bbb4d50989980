"""flexmoe: train one language model together without pooling data (the FlexOlmo method)."""

__version__ = "0.1.0"
