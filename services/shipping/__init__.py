"""Shipping: books a shipment for an approved order and completes it, or fails it; serializes cancellations."""
