"""Benchmarks of the module against native Synapse; each file is a script (see its docstring)."""
