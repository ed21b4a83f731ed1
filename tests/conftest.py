"""Test-suite root: its folder is on sys.path (pytest's rootdir conftest), so tests import shared
reference implementations with `from references import ...`."""
