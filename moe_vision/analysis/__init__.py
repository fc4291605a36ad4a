"""Analyses of trained models: expert attribution (:mod:`.attribution`) and probes."""
