"""Result rows and reading them, without torch: the schema (schema.py), writing and loading (rows.py), tables,
figures and the regression rules. `from bench.results import load` reads a folder of rows."""

from bench.results.rows import load

__all__ = ["load"]
