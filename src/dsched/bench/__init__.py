"""``dsched bench``: side-by-side benchmarks of dsched and ``dask scheduler``."""
