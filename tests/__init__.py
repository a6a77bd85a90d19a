"""Tests mirror the rooms: components/, pipelines/, serving/; end-to-end runs are marked slow.

A package, so `tests.conftest` resolves to this folder even after a library (IPython, pulled in
by apache_beam) has put another `tests` package on sys.path.
"""
