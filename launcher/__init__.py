"""Turns one recipe plus one cluster profile into a running job."""
