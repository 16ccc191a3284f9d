"""Proximity data generation."""
