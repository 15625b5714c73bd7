"""Evaluation: task suites with environments (`suite`), BFCL v4 scoring (`bfcl_scoring`) and
results tables (`report`)."""
