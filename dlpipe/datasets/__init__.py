"""Procedural datasets and vocabularies: a library that data stages and models both use."""
