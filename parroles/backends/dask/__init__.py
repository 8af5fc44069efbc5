"""A Dask distributed cluster; the client stays the only ledger writer."""
