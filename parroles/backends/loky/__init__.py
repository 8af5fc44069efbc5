"""Local worker processes: one single-worker loky executor per concurrency slot."""
