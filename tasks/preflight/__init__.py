"""Checks a config against the models, machines and endpoints it names before a run spends anything (`lvr check`)."""
