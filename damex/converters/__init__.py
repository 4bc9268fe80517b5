"""Offline converters from datasets' own formats into the layouts damex's configs read."""
