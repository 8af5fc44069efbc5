"""The parent's side of a batch: the API, the one loop, the book of runs (parent process only)."""
