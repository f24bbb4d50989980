"""One data owner's expert: training against the frozen anchor, the package format, verification."""
