"""The model-free core: the nested space, costs, adapter protocols, the adapter registry, errors."""
