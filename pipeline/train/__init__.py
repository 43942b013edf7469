"""Training glue for the bundle: the iteration step, the skip-weight schedule, EMA, resume state, learning curves."""
