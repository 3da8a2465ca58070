"""Bridges to libraries that hold adapters in memory."""
