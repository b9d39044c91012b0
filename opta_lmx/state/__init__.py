"""Desired state and observed status: pure data and its persistence. Imports nothing internal."""
