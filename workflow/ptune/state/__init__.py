"""What survives a killed stage and keeps runs honest: atomic writes, locks, resume state, checkpoints,
fault points, determinism, the stage log, multi-process launch."""
