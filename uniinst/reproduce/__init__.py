"""Reproduction suites: the suite config and its report in the paper's tables (no Ray here;
:mod:`uniinst.ray.reproduce` runs suites)."""
