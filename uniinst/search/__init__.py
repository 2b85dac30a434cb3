"""Hyperparameter search: the search config and the collection of its results (no Ray here;
:mod:`uniinst.ray.tune` runs searches)."""
