"""Model bundle, triage ensemble, detector and gate."""
