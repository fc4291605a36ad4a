"""Sweeps: expert combinations x fusions x recipes x seeds (:mod:`.sweep`) and the executors that
run their cells (:mod:`.executors`)."""
