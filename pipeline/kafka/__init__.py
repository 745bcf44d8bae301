"""Kafka plumbing shared by the serving process, the monitor and the tools: client
configuration, topic administration and message helpers.
"""
