"""Code copied into bundles. This file only makes the folder installable as package data."""
