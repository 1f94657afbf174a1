"""Sources: where flows come from (files, stdin, Hubble, Kafka, the node agent)."""
