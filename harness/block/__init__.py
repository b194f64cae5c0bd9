"""harness.block"""
