"""Benchmarks behind ``pysynth bench`` (installed as ``pysynth.bench``).

Every case times a pysynth operation next to the well-kept library way of doing the same job, in the same run,
and reports median and spread; results go to a table on stdout and to JSON with the machine, versions and commit.
"""
