"""harness.vm"""
