"""Cache keys: what a run is made of (``keys``), and the digest of the code it runs (``code``)."""
