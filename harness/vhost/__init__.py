"""harness.vhost"""
