"""Pipeline stages: filter, healthcheck, sample, aggregate, redact (see docs/stages.md)."""
