"""Typed wrappers over confluent-kafka and the local broker used for demos and tests."""
