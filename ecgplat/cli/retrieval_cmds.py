"""Placeholder: commands are registered here by their owner."""
