"""harness.crash"""
