"""Inventory: reserves an order's stock all-or-nothing, releases it on compensation, ships it on completion."""
