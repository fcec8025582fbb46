"""Placeholder: this plugin module is being written."""
