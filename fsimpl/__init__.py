"""dittofs engine: GPFS-style ditto snapshots over a plain disk (standard library only)."""
