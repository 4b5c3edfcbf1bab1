"""snapctl, the command line of dittofs."""
