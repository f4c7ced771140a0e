"""Approval: grants small orders at once, asks a human for large ones, and rules on decisions and deadlines."""
