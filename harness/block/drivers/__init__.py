"""Block drivers, one module each; see harness/block/registry.py."""
