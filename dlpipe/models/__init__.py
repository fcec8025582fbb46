"""Built-in architectures, one package each, and the modules families share."""
