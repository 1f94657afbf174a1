"""The flow model: the Arrow schema, ids, and the Hubble, ECS and protobuf encodings of a flow."""
