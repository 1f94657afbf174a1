"""Pipeline runtime: envelopes, acknowledgements, queues, the run loop."""
