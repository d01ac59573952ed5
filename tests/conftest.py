"""Shared by every test under tests/ (kept deliberately empty of fixtures).

Layout: tests/unit/ holds fast tests of the pure layers; tests/integration/ starts real
scheduler and `dask worker` processes (its own conftest.py has those fixtures). There are no
__init__.py files: pytest imports test modules by their base name, so every test file name
must be unique across the whole tests/ tree.

Run only the fast tests with `-m "not integration"`.
"""
