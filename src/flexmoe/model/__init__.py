"""Model runtime: configs, the MoE feed-forward module, weight-name mapping, loading and saving."""
