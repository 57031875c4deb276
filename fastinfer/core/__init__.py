"""Engine core: requests, the KV block pool, the KV-cache manager and the scheduler. Plain Python, no torch."""
