"""Outputs: the files a run writes, their provenance, tables and figures."""
