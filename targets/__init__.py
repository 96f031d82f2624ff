"""Built-in target profiles (YAML). This file only makes the folder installable as package data."""
